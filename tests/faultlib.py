"""Shared helpers for the fault-injection tests: run the real CLI in subprocesses, hurt it, inspect the result.

Every trainer runs in its own process group (so a SIGKILL takes the whole job, like a lost machine) with
2 fake CPU devices, a tiny model and a seeded synthetic dataset. One session-wide directory holds the
dataset, JAX's persistent compilation cache (so a restart costs an import, not a compile) and an
uninterrupted reference run that every faulted run must match bit for bit.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STEPS = 30  # train.steps of every run compared with the reference
DEVICE_FLAGS = "--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=60"
MODEL = ["model.d_model=32", "model.n_layers=1", "model.seq_len=32", "data.batch_size=8"]
QUIET = ["train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.eval_every=0"]
START_LINE = r"device\(s\) in \d+ process"  # regex: the one line a trainer logs once restore/init is done
LOCK_FILE = ".jaxckpt.lock"  # the trainer's flock in its workdir
PROC_TIMEOUT = 240.0  # seconds any single CLI process may live before the test fails

_LIVE: set[Proc] = set()


# -- processes ---------------------------------------------------------------------------------------


# A pooled launcher (``python -c LAUNCHER``) pays the imports, then waits for one JSON line of CLI arguments
# on stdin and runs exactly what the ``jaxckpt`` console script runs: ``sys.exit(jaxckpt.cli.main(ARGS))``.
# Importing initialises no JAX backend and starts no thread, so each trainer still starts from scratch; the
# import (most of a start-up on 2 busy cores) just happens while the previous process is still working.
LAUNCHER = (
    "import json, sys\n"
    "import jaxckpt.cli, jaxckpt.trainer  # noqa: F401\n"
    "line = sys.stdin.readline()\n"
    "if not line.strip():\n"
    "    sys.exit(0)\n"
    "sys.exit(jaxckpt.cli.main(json.loads(line)))\n"
)
POOL_SIZE = 2
_POOL: list[Proc] = []


class Proc:
    """A subprocess in its own session; a thread reads its merged stdout/stderr line by line.

    By default a pooled launcher that runs the CLI once :meth:`go` hands it arguments; ``cmd`` runs any
    other command at once instead.
    """

    def __init__(self, env: dict[str, str] | None, cmd: list[str] | None = None, name: str = "") -> None:
        self.name = name or "launcher"
        self.args: list[str] = []
        self.started = cmd is not None
        self.t0 = time.monotonic()
        self.popen = subprocess.Popen(
            cmd or [sys.executable, "-c", LAUNCHER], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL if cmd else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.popen.pid
        self.lines: list[tuple[float, str]] = []
        self.eof = False
        self.rc: int | None = None
        self._cond = threading.Condition()
        self._hooks: list[tuple[re.Pattern[str], Callable[[str], None]]] = []
        self._reader = threading.Thread(target=self._read, name=f"reader-{self.pid}", daemon=True)
        self._reader.start()
        if cmd is not None:
            _LIVE.add(self)

    def go(self) -> Proc:
        """Run the CLI with ``self.args`` now; the process's clock starts here."""
        assert not self.started and self.popen.stdin is not None and self.args
        self.t0 = time.monotonic()
        self.started = True
        try:
            self.popen.stdin.write((json.dumps(self.args) + "\n").encode())
            self.popen.stdin.close()
        except BrokenPipeError:  # the launcher died while importing; finish() reports its output
            pass
        return self

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                fired = [h for h in self._hooks if h[0].search(line)]
                for h in fired:
                    self._hooks.remove(h)
            for _, fn in fired:  # run hooks first: they are latency-sensitive (signals)
                fn(line)
            with self._cond:
                self.lines.append((time.monotonic() - self.t0, line))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    # -- observing ----------------------------------------------------------------------------------
    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(f"  [{t:7.2f}s] {line}" for t, line in self.lines[-n:])

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def alive(self) -> bool:
        return self._exited() is None

    def _exited(self) -> int | None:
        """Exit status if the process has ended, without reaping it (its pid stays ours)."""
        if self.rc is not None:
            return self.rc
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.popen.returncode
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def on_line(self, pattern: str, fn: Callable[[str], None]) -> None:
        """Call ``fn(line)`` from the reader thread, once, for the first line matching ``pattern``."""
        with self._cond:
            self._hooks.append((re.compile(pattern), fn))

    def wait_line(self, pattern: str, timeout: float = PROC_TIMEOUT) -> str | None:
        """First line matching ``pattern`` (regex); None if the output ended without one."""
        rx, seen, deadline = re.compile(pattern), 0, time.monotonic() + timeout
        with self._cond:
            while True:
                for _, line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                if self.eof:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r} in {timeout}s:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def wait_until(self, pred: Callable[[], bool], timeout: float = PROC_TIMEOUT, poll: float = 0.005) -> bool:
        """True once ``pred()`` holds; False if the process exited first."""
        deadline = time.monotonic() + timeout
        while not pred():
            if not self.alive():
                return pred()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: condition not met in {timeout}s:\n{self.tail()}")
            time.sleep(poll)
        return True

    def sleep(self, seconds: float) -> bool:
        """Sleep while the process runs; False if it exited meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            time.sleep(min(0.005, max(deadline - time.monotonic(), 0)))
        return self.alive()

    # -- acting -------------------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        """Send ``sig`` to the trainer process only (what a scheduler's SIGTERM does)."""
        if self.alive():
            os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (the trainer and any children): a lost machine."""
        if self.rc is None:  # not reaped yet, so the pid (= pgid) cannot have been reused
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float = PROC_TIMEOUT) -> int:
        """Wait for exit, SIGKILL anything left in the group, reap; returns the exit code (-N = signal N)."""
        if not self.started:
            raise RuntimeError(f"{self.name}: prewarmed process was never told to go")
        deadline = time.monotonic() + timeout
        while self._exited() is None:
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{self.name} did not exit within {timeout}s (killed):\n{self.tail()}")
            time.sleep(0.01)
        self.kill_group()  # stragglers (none expected) must not outlive the test
        self.rc = self.popen.wait()
        self._reader.join(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        _LIVE.discard(self)
        up = next((f"{t:.1f}s" for t, line in self.lines if re.search(START_LINE, line)), "never")
        print(f"[faultlib] {self.name}: exit {self.rc} after {self.elapsed():.1f}s (up at {up})")
        return self.rc

    def close(self) -> None:
        """Kill and reap whatever is left; safe to call twice."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()
        if self.rc is None:
            self.kill_group()
            self.rc = self.popen.wait()
        self._reader.join(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        _LIVE.discard(self)


def kill_all() -> None:
    """Finalizer: no trainer started by these tests may outlive them (idle pooled launchers may)."""
    for p in list(_LIVE):
        p.close()


def close_pool() -> None:
    while _POOL:
        _POOL.pop().close()


atexit.register(close_pool)
atexit.register(kill_all)


def stray_processes(marker: str) -> list[str]:
    """Live processes (other than us and idle pooled launchers) started with ``FAULTLIB_ROOT=marker``."""
    idle = {p.pid for p in _POOL}
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in idle | {os.getpid()}:
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"FAULTLIB_ROOT={marker}".encode() in environ and "zombie" not in state:
            out.append(f"{d.name}: {cmd[:200]}")
    return out


# -- the shared setup --------------------------------------------------------------------------------


@dataclass
class Reference:
    """The uninterrupted run: loss per step and the arrays of its final checkpoint."""

    workdir: Path
    losses: dict[int, float]
    ckpt_bytes: int
    _state: dict[str, np.ndarray] | None = None

    @property
    def state(self) -> dict[str, np.ndarray]:
        if self._state is None:
            self._state = restore_arrays(self.workdir / "checkpoints" / str(STEPS) / "state")
        return self._state


@dataclass
class Setup:
    """Paths and environment shared by every fault test in a session."""

    root: Path
    data: Path
    env: dict[str, str]
    _ref: Reference | None = field(default=None, repr=False)

    def train_args(self, workdir: Path, *overrides: str, stop_at: int | None = None) -> list[str]:
        extra = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
        return ["train", "--workdir", str(workdir), *extra, f"data.path={self.data}", *MODEL, *QUIET,
                f"train.steps={STEPS}", *overrides]

    def _launcher(self, args: list[str], name: str) -> Proc:
        """A warm pooled launcher (or a new one) given ``args``; the pool is topped up behind it."""
        while _POOL and not _POOL[0].alive():
            _POOL.pop(0).close()
        p = _POOL.pop(0) if _POOL else Proc(self.env)
        p.args, p.name = args, name
        _LIVE.add(p)
        while len(_POOL) < POOL_SIZE:
            _POOL.append(Proc(self.env))
        return p

    def spawn(self, workdir: Path, *overrides: str, stop_at: int | None = None, name: str = "") -> Proc:
        """``jaxckpt train ...`` on ``workdir``, imported and waiting for :meth:`Proc.go` (touches nothing yet)."""
        return self._launcher(self.train_args(workdir, *overrides, stop_at=stop_at), name or f"train {workdir.name}")

    def start(self, workdir: Path, *overrides: str, stop_at: int | None = None, name: str = "") -> Proc:
        """``jaxckpt train ...`` on ``workdir``, running now."""
        return self.spawn(workdir, *overrides, stop_at=stop_at, name=name).go()

    def cli(self, *args: str, timeout: float = PROC_TIMEOUT) -> tuple[int, str]:
        """Run a CLI command to completion; (exit code, merged output)."""
        p = self._launcher(list(args), " ".join(args[:2])).go()
        rc = p.finish(timeout)
        return rc, p.output

    def train(self, workdir: Path, *overrides: str, stop_at: int | None = None,
              prewarmed: Proc | None = None) -> tuple[int, str]:
        """Train to the end (or ``stop_at``); ``prewarmed`` is a :meth:`spawn` of the same command."""
        p = prewarmed.go() if prewarmed is not None else self.start(workdir, *overrides, stop_at=stop_at)
        rc = p.finish()
        return rc, p.output

    @property
    def reference(self) -> Reference:
        if self._ref is None:
            self._ref = _reference(self)
        return self._ref


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_SETUPS: dict[Path, Setup] = {}


def get_setup(basetemp: Path) -> Setup:
    """The session's dataset + compile cache + environment (built once, shared by all modules)."""
    root = Path(basetemp) / "jaxckpt-faults"
    if root in _SETUPS:
        return _SETUPS[root]
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": DEVICE_FLAGS,
        "JAX_PLATFORMS": "cpu",
        "JAXCKPT_CACHE": str(root / "cache"),
        # A restart should cost an import, not a compile; the reference run fills the cache.
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "1",
        "FAULTLIB_ROOT": str(root),  # marks our processes for the stray-process check
    })
    setup = Setup(root, root / "ds", env)
    with _flock(root / ".lock"):
        if not (setup.data / "meta.json").is_file():
            text = root / "text.txt"
            rng = random.Random(1234)
            words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
                     for _ in range(2000)]
            text.write_text(" ".join(rng.choice(words) + ("\n" if rng.random() < 0.1 else "")
                                     for _ in range(60000)))
            # In-process (the CLI's prepare is this function): saves a JAX start-up on a busy machine.
            from jaxckpt.data import prepare

            prepare([text], setup.data)
    _SETUPS[root] = setup
    return setup


def _reference(setup: Setup) -> Reference:
    workdir = setup.root / "reference"
    with _flock(setup.root / ".lock"):
        if not (workdir / "DONE").is_file():
            shutil.rmtree(workdir, ignore_errors=True)
            # Checkpoints only at the end: the faulted runs save every few steps, and saving must not
            # change a single bit of training.
            rc, out = setup.train(workdir, "checkpoint.every_steps=1000")
            assert rc == 0, f"reference run failed ({rc}):\n{out}"
            (workdir / "DONE").write_text("ok\n")
    rows = read_rows(workdir)
    losses = {r["step"]: r["loss"] for r in rows}
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    return Reference(workdir, losses, dir_bytes(workdir / "checkpoints" / str(STEPS)))


# -- syscall-level fault injection -------------------------------------------------------------------


def process_state(pid: int) -> str:
    """One-letter state from /proc (R, S, T = stopped, Z, ...); "" if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class SyscallTracer:
    """``strace`` attached to a (stopped) trainer: ``syscalls`` touching ``paths`` are delayed and reported.

    The delay holds the trainer inside that syscall, so a SIGKILL sent on the first report lands
    deterministically right there (e.g. half-way through deleting a directory, or just before a file is
    created). Paths are matched by strace (``-P``; *at calls are resolved through their dirfd).
    """

    def __init__(self, pid: int, syscalls: str, paths: list[Path], delay_s: float = 3.0) -> None:
        self.pid = pid
        cmd = ["strace", "-f", "-qq", "-p", str(pid), "-e", f"trace={syscalls}",
               "-e", f"inject={syscalls}:delay_enter={int(delay_s * 1e6)}"]
        for p in paths:
            cmd += ["-P", str(p)]
        self.proc = Proc(None, cmd=cmd, name=f"strace -p {pid}")

    def attached(self) -> bool:
        """strace traces every thread of the trainer."""
        try:
            tasks = list(Path(f"/proc/{self.pid}/task").iterdir())
        except OSError:
            return False
        for t in tasks:
            try:
                status = (t / "status").read_text()
            except OSError:
                continue
            if re.search(r"^TracerPid:\s+0$", status, re.M):
                return False
        return bool(tasks)

    def wait_attached(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.attached():
            if not self.proc.alive():
                raise RuntimeError(f"strace exited early:\n{self.proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"strace did not attach in {timeout}s:\n{self.proc.tail()}")
            time.sleep(0.01)

    def close(self) -> None:
        self.proc.close()


# -- reading workdirs ---------------------------------------------------------------------------------


def read_rows(workdir: Path) -> list[dict[str, Any]]:
    """Every row of ``metrics.jsonl`` (strict: a torn line is an error)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_written(workdir: Path) -> int:
    """Complete rows in a ``metrics.jsonl`` still being appended to (safe to poll while a trainer runs)."""
    try:
        return (Path(workdir) / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def last_losses(workdir: Path) -> dict[int, float]:
    """Loss per step, the last row winning (resumed runs re-log steps)."""
    return {r["step"]: r["loss"] for r in read_rows(workdir)}


def max_logged_step(workdir: Path) -> int:
    return max((r["step"] for r in read_rows(workdir)), default=0)


def step_dirs(workdir: Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def manifest_steps(workdir: Path) -> list[int]:
    from jaxckpt import integrity

    return [s for s in step_dirs(workdir) if integrity.has_manifest(Path(workdir) / "checkpoints" / str(s))]


def verify_problems(workdir: Path, step: int) -> list[str]:
    """What ``jaxckpt ckpt verify WORKDIR --step STEP`` checks, in-process (no JAX start-up per call)."""
    from jaxckpt import ckpt_tools

    ok, report = ckpt_tools.verify(Path(workdir), step)
    return [] if ok else [report]


def dir_bytes(path: Path) -> int:
    """Bytes a directory occupies on disk (like ``du``)."""
    return sum(p.stat().st_blocks * 512 for p in Path(path).rglob("*")) + Path(path).stat().st_blocks * 512


def restore_arrays(state_dir: Path) -> dict[str, np.ndarray]:
    """A checkpoint's ``state`` item restored by Orbax itself, as host arrays keyed by tree path."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(Path(state_dir).resolve())
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def resumed_from(output: str) -> int | None:
    m = re.search(r"resumed from checkpoint (\d+)", output)
    return int(m.group(1)) if m else None


def largest_array_file(step_dir: Path) -> Path:
    """The biggest data file of a checkpoint's OCDBT store (holds array bytes)."""
    files = [p for p in (Path(step_dir) / "state" / "ocdbt.process_0" / "d").iterdir() if p.is_file()]
    assert files, f"no array files under {step_dir}"
    return max(files, key=lambda p: (p.stat().st_size, p.name))


def assert_matches_reference(workdir: Path, ref: Reference, context: str = "") -> None:
    """Every logged loss (all rows, re-logged ones too) and the final checkpoint equal the reference bit for bit."""
    rows = read_rows(workdir)
    wrong = [(r["step"], r["loss"], ref.losses.get(r["step"])) for r in rows if r["loss"] != ref.losses.get(r["step"])]
    assert not wrong, f"{context}losses differ from the uninterrupted run (step, got, want): {wrong[:10]}"
    logged = sorted({r["step"] for r in rows})
    assert logged == list(range(1, STEPS + 1)), f"{context}steps logged: {logged}"
    final = Path(workdir) / "checkpoints" / str(STEPS)
    assert final.is_dir(), f"{context}no final checkpoint {final}; have {step_dirs(workdir)}"
    got, want = restore_arrays(final / "state"), ref.state
    assert sorted(got) == sorted(want), f"{context}array names differ: {set(got) ^ set(want)}"
    diff = [k for k in want if got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k])]
    assert not diff, f"{context}final checkpoint arrays differ from the reference: {diff[:10]}"


def no_traceback(output: str) -> bool:
    return "Traceback (most recent call last)" not in output
