"""Helpers for the multi-process tests: CLI subprocesses that can be watched, hurt and never left behind.

Every process started here runs in its own session (so ``os.killpg`` takes it and everything it started),
writes its merged stdout/stderr to a log file (no pipe can fill up and stall it), and is watched by a
thread that records every descendant it spawns and the coordinator port each one uses. ``leftovers()``
and ``busy_ports()`` then prove that nothing outlived a test; ``kill_all()`` is the finalizer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
PROC_TIMEOUT = 300.0  # seconds any one CLI process may live before the test fails

_STARTED: list[Proc] = []  # every Proc of this session, in start order
_SEEN: dict[int, float] = {}  # pid -> create_time of every descendant ever observed
_PORTS: set[int] = set()  # every coordinator port a watched process used
_LOCK = threading.Lock()


def _coordinator_port(p: psutil.Process) -> int | None:
    """The coordinator port of a ``jaxckpt train`` process (flag or ``JAXCKPT_COORDINATOR``), if any."""
    try:
        cmd = p.cmdline()
        if "--coordinator" in cmd:
            return int(cmd[cmd.index("--coordinator") + 1].rpartition(":")[2])
        coord = p.environ().get("JAXCKPT_COORDINATOR")
    except (psutil.Error, ValueError, IndexError):
        return None
    return int(coord.rpartition(":")[2]) if coord else None


class Proc:
    """``python -m jaxckpt.cli ARGS`` in a new session, output to ``log``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, name: str = "") -> None:
        self.args, self.log, self.name = args, Path(log), name or " ".join(args[:2])
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "jaxckpt.cli", *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self.popen.pid
        self.t0 = time.monotonic()
        self.t_exit: float | None = None  # monotonic time at which the exit was first seen
        self.rc: int | None = None
        self.ports: set[int] = set()
        self.ranks: dict[int, psutil.Process] = {}  # JAXCKPT_PROCESS_ID -> child (for `launch`)
        with _LOCK:
            _STARTED.append(self)
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{self.pid}", daemon=True)
        self._watcher.start()

    # -- watching -------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Record descendants, their coordinator ports and ranks until the process exits."""
        try:
            me = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while self.popen.poll() is None:
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                procs = [me]
            for p in procs:
                try:
                    created = p.create_time()
                except psutil.Error:
                    continue
                with _LOCK:
                    _SEEN.setdefault(p.pid, created)
                port = _coordinator_port(p)
                if port is not None:
                    self.ports.add(port)
                    with _LOCK:
                        _PORTS.add(port)
                if p.pid != self.pid and p not in self.ranks.values():
                    try:
                        rank = p.environ().get("JAXCKPT_PROCESS_ID")
                    except psutil.Error:
                        rank = None
                    if rank is not None and "jaxckpt.cli" in " ".join(p.cmdline()):
                        self.ranks[int(rank)] = p
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        lines = [ln for ln in self.output().splitlines() if not ln.startswith(("[Gloo]", "    @ "))]
        return f"--- {self.name} (pid {self.pid}), last lines of {self.log}:\n" + "\n".join(lines[-n:])

    def poll(self) -> int | None:
        if self.rc is None and self.popen.poll() is not None:
            self.rc, self.t_exit = self.popen.returncode, time.monotonic()
        return self.rc

    def wait_for(self, pred: Callable[[], bool], timeout: float = PROC_TIMEOUT, poll: float = 0.01) -> bool:
        """True as soon as ``pred()`` holds; False if the process exited first (``pred`` checked once more)."""
        deadline = time.monotonic() + timeout
        while not pred():
            if self.poll() is not None:
                return pred()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: condition not met within {timeout:.0f}s\n{self.tail()}")
            time.sleep(poll)
        return True

    def rank(self, r: int, timeout: float = 60.0) -> psutil.Process:
        """The child of a ``jaxckpt launch`` that runs process ``r``."""
        self.wait_for(lambda: r in self.ranks, timeout)
        assert r in self.ranks, f"launcher has no process {r}\n{self.tail()}"
        return self.ranks[r]

    # -- ending ---------------------------------------------------------------------------------------
    def wait(self, timeout: float = PROC_TIMEOUT) -> int:
        """Exit status (-N = killed by signal N); on timeout the whole session is killed and the test fails."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{self.name} still running after {timeout:.0f}s (killed)\n{self.tail()}")
            time.sleep(0.01)
        self.close()
        return self.rc  # type: ignore[return-value]

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process's whole session (a lost machine, for SIGKILL)."""
        if self.popen.returncode is None:  # not reaped: the pid (= pgid) cannot have been reused
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Kill whatever is left of the session and reap the process; safe to call twice."""
        self.kill_group()
        self.popen.wait()
        self.poll()
        self._watcher.join(timeout=10)


def kill_all() -> None:
    """Finalizer: SIGKILL every session started here and every descendant ever seen that is still alive."""
    for p in list(_STARTED):
        p.close()
    for pid, created in list(_SEEN.items()):
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.kill()
        except psutil.Error:
            pass


def leftovers(baseline: set[int]) -> list[str]:
    """Processes that outlived their test: running Procs, descendants ever seen, or new children of ours."""
    out = [f"{p.name} (pid {p.pid}) still running" for p in _STARTED if p.poll() is None]
    for pid, created in list(_SEEN.items()):
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"pid {pid} still alive: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            pass
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in baseline and child.status() != psutil.STATUS_ZOMBIE:
                out.append(f"child of the test pid {child.pid}: {' '.join(child.cmdline())[:200]}")
        except psutil.Error:
            pass
    return out


def started() -> list[Proc]:
    """Every Proc started so far in this session."""
    with _LOCK:
        return list(_STARTED)


def children_now() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def ports_used() -> set[int]:
    with _LOCK:
        return set(_PORTS)


def busy_ports() -> list[str]:
    """Coordinator ports used so far that some socket still listens on or that cannot be bound again."""
    used = ports_used()
    out = []
    try:
        listening = {c.laddr.port: c.pid for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr}
    except psutil.Error:
        listening = {}
    for port in sorted(used):
        if port in listening:
            out.append(f"port {port} still has a listener (pid {listening[port]})")
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError as e:
                out.append(f"port {port} cannot be bound again: {e}")
    return out


# -- reading workdirs -----------------------------------------------------------------------------------


def rows(workdir: Path) -> list[dict[str, Any]]:
    """Every complete row of ``metrics.jsonl`` (written by process 0), in order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def n_rows(workdir: Path) -> int:
    try:
        return (Path(workdir) / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def last_losses(workdir: Path) -> dict[int, float]:
    """Loss per step, the last row of a step winning (a resumed run re-logs steps)."""
    return {r["step"]: r["loss"] for r in rows(workdir)}


def step_dirs(workdir: Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def committed_steps(workdir: Path) -> list[int]:
    """Steps whose checksum manifest exists (what the trainer calls complete)."""
    from jaxckpt import integrity

    return [s for s in step_dirs(workdir) if integrity.has_manifest(Path(workdir) / "checkpoints" / str(s))]


def ckpt_meta(workdir: Path, step: int) -> dict[str, Any]:
    return json.loads((Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def resumed_from(output: str) -> int | None:
    m = re.search(r"resumed from checkpoint (\d+)", output)
    return int(m.group(1)) if m else None


def ocdbt_stores(state_dir: Path) -> list[str]:
    """The OCDBT stores (``ocdbt.process_*`` directories) an item's save wrote, by name (jaxckpt.substores)."""
    from orbax.checkpoint._src.serialization import ocdbt_process_spec

    return sorted(p.name for p in Path(state_dir).glob(ocdbt_process_spec.PROCESS_PREFIX + "*"))


def _by_path(tree: Any) -> dict[str, Any]:
    """A restored tree's leaves as host numpy arrays, keyed by tree path."""
    import jax
    import numpy as np

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_tree(state_dir: Path) -> Any:
    """The ``state`` item's tree of array metadata, as Orbax reads it."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.metadata(Path(state_dir).resolve()).item_metadata.tree


def fast_restore_arrays(state_dir: Path) -> dict[str, Any]:
    """The same as :func:`restore_arrays`, read by ``jaxckpt.fastread`` onto this process's first device."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from jaxckpt import fastread

    one = SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), _saved_tree(state_dir))
    return _by_path(fastread.restore(Path(state_dir).resolve(), abstract))


def restore_arrays(state_dir: Path) -> dict[str, Any]:
    """A checkpoint's ``state`` item as host numpy arrays keyed by tree path, whatever topology wrote it.

    Orbax restores each leaf as ``np.ndarray`` (the saved shardings name devices of other processes).
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    tree = _saved_tree(state_dir)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(Path(state_dir).resolve(), args=ocp.args.PyTreeRestore(item=tree, restore_args=args))
    return _by_path(out)
