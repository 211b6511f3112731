"""Multi-process training on CPU: 2 JAX processes x 2 fake devices each, talking over gloo.

What is proven, against the real CLI (``jaxckpt launch`` and ``jaxckpt train --coordinator``):

1. stop every process after a checkpoint, relaunch the same command: bit-identical to an uninterrupted run;
2. the same checkpoint resumes in 1 process (4 devices) and on another mesh (1 process, fsdp=2 on 2 devices)
   with the same data stream (repositioned at the global batch), losses equal to rtol 1e-5; with fsdp=4 over
   both processes, each writes its shards into OCDBT stores of its own (every run here saves into several,
   ``STORES``), and plain Orbax and jaxckpt.fastread read the merged checkpoint to the same bytes;
3. SIGTERM to one process: every process saves the same step and exits 143, the launcher exits 143, and the
   resumed run is bit-identical to the uninterrupted one;
4. SIGKILL of one process: the other fails (non-zero) within a bound, and the run resumes from the last
   committed checkpoint, bit-identical again;
5. after every test no process started by it is alive and every coordinator port is free again.

Cost control (each 2-process start is ~30-60 s of JAX start-up and compilation on 2 cores): one tiny
model and dataset, N=12 steps, one uninterrupted reference run and one stopped run shared by the module,
and 3 and 4 share one workdir (launch -> SIGTERM -> resume by hand -> SIGKILL -> relaunch to N).
2-process runs have JAX's persistent compilation cache off (see ``World._env``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mplib
import numpy as np
import pytest
from mplib import Proc

from jaxckpt.launch import free_port

N = 12  # train.steps of every run
K = 4  # --stop-at-step of the stopped run
EVERY = ["checkpoint.every_steps=2"]  # periodic saves in the interrupted runs (the reference saves only at N)
MODEL = ["model.d_model=32", "model.n_layers=1", "model.seq_len=32", "data.batch_size=8"]
# Every save of these runs is spread over several OCDBT stores per process (jaxckpt.substores; by default only
# saves over 1 GiB per process are), so that resuming from them across processes and topologies is proven too.
STORES = ["checkpoint.ocdbt_store_mb=0.05"]
QUIET = ["train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.eval_every=0"]
COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=60"
HEARTBEAT_S = 10  # --heartbeat-timeout: a silent peer is declared dead after this long
FAIL_FAST_BOUND_S = 90.0  # a SIGKILLed peer must bring the survivor down within this
PREEMPTED = re.compile(r"preempted by (.+?): checkpoint at step (\d+) is durable")

pytestmark = pytest.mark.timeout(900)  # the first test sets up three 2-process runs; each Proc has its own limit


@dataclass
class World:
    """Dataset, environment and command lines shared by the module."""

    root: Path
    data: Path
    env: dict[str, str]

    def train_args(self, workdir: Path, *overrides: str, stop_at: int | None = None,
                   flags: tuple[str, ...] = ()) -> list[str]:
        extra = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
        return ["train", "--workdir", str(workdir), *extra, *flags, f"data.path={self.data}", *MODEL, *STORES, *QUIET,
                f"train.steps={N}", *overrides]

    def _env(self, devices: int | None, processes: int) -> dict[str, str]:
        env = dict(self.env)
        flags = [COLLECTIVE_TIMEOUT] + ([f"--xla_force_host_platform_device_count={devices}"] if devices else [])
        env["XLA_FLAGS"] = " ".join(flags)
        if processes > 1 and os.environ.get("JAXCKPT_TEST_MP_CACHE") != "1":
            # Works around a jaxckpt hazard (train.compilation_cache defaults to "auto"): JAX writes its
            # persistent cache from process 0 only and, on CPU, keys it by device assignment, so on a relaunch
            # process 0 loads the train step while process 1 compiles it. If process 0 then waits over 30 s
            # at the first collective (Gloo's fixed context timeout) the run dies with "Gloo context
            # initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out" -- seen here on a loaded
            # machine. With the cache off both compile and arrive together. JAXCKPT_TEST_MP_CACHE=1 keeps it on.
            env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        return env

    def launch(self, workdir: Path, *overrides: str, stop_at: int | None = None, name: str = "") -> Proc:
        """``jaxckpt launch --processes 2 --devices-per-process 2 -- train …``."""
        args = ["launch", "--processes", "2", "--devices-per-process", "2", "--grace", "60", "--",
                *self.train_args(workdir, *overrides, stop_at=stop_at,
                                 flags=("--heartbeat-timeout", str(HEARTBEAT_S)))]
        name = name or f"launch {workdir.name}"
        return Proc(args, self._env(None, 2), self.root / "logs" / f"{name.replace(' ', '-')}.log", name)

    def single(self, workdir: Path, devices: int, *overrides: str, name: str = "") -> Proc:
        """Plain ``jaxckpt train`` in one process with ``devices`` fake devices."""
        name = name or f"train {workdir.name}"
        return Proc(self.train_args(workdir, *overrides), self._env(devices, 1),
                    self.root / "logs" / f"{name.replace(' ', '-')}.log", name)

    def manual(self, workdir: Path, *overrides: str, port: int, name: str = "") -> list[Proc]:
        """Two ``jaxckpt train --coordinator`` processes started by the test itself (to hurt one of them)."""
        procs = []
        for rank in range(2):
            flags = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank),
                     "--heartbeat-timeout", str(HEARTBEAT_S))
            nm = f"{name or workdir.name}-p{rank}"
            procs.append(Proc(self.train_args(workdir, *overrides, flags=flags), self._env(2, 2),
                              self.root / "logs" / f"{nm}.log", nm))
        return procs


@dataclass
class Reference:
    """The uninterrupted 2-process run: loss per step and the arrays of its final checkpoint."""

    workdir: Path
    losses: dict[int, float]
    state: dict[str, Any]
    seconds: float


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A seeded ~240 KB text prepared once; JAXCKPT_CACHE (and with it the XLA cache) in a temp dir."""
    root = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAXCKPT_CACHE": str(root / "cache"),
        "JAX_COMPILATION_CACHE_DIR": str(root / "cache" / "jaxckpt" / "xla"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "1",
    })
    env.pop("XLA_FLAGS", None)
    w = World(root, root / "ds", env)
    rng = random.Random(1234)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(2000)]
    text = root / "text.txt"
    text.write_text(" ".join(rng.choice(words) + ("\n" if rng.random() < 0.1 else "") for _ in range(40000)))
    try:
        p = Proc(["prepare", "--input", str(text), "--out", str(w.data)], w._env(1, 1), root / "logs" / "prepare.log")
        assert p.wait(120) == 0, p.tail()
        yield w
    finally:
        mplib.kill_all()


@pytest.fixture(scope="module")
def baseline_children(world: World) -> set[int]:
    """Children the test process already had before this module started any."""
    return mplib.children_now()


@pytest.fixture(autouse=True)
def nothing_left_behind(baseline_children: set[int]) -> Iterator[None]:
    """After each test: no process started by this module is alive and every coordinator port is free."""
    yield
    strays = mplib.leftovers(baseline_children)
    mplib.kill_all()
    assert not strays, f"processes left behind: {strays}"
    busy = mplib.busy_ports()
    assert not busy, f"coordinator ports not released: {busy}"


@pytest.fixture(scope="module")
def ref(world: World) -> Reference:
    """2 processes, 0 -> N without interruption; one checkpoint, at N (saving must not change a bit)."""
    workdir = world.root / "reference"
    p = world.launch(workdir, "checkpoint.every_steps=1000", name="reference")
    rc = p.wait()
    assert rc == 0, f"reference run failed ({rc})\n{p.tail()}"
    losses = mplib.last_losses(workdir)
    assert sorted(losses) == list(range(1, N + 1)), sorted(losses)
    assert mplib.committed_steps(workdir) == [N]
    meta = mplib.ckpt_meta(workdir, N)
    assert (meta["process_count"], meta["device_count"]) == (2, 4), meta
    # The mesh is data-parallel: every array is replicated and process 0 writes them all (replica 0).
    stores = set(mplib.ocdbt_stores(workdir / "checkpoints" / str(N) / "state"))
    assert {"ocdbt.process_0", "ocdbt.process_0s1", "ocdbt.process_0s2"} <= stores, stores
    return Reference(workdir, losses, mplib.restore_arrays(workdir / "checkpoints" / str(N) / "state"),
                     p.t_exit - p.t0)


@pytest.fixture(scope="module")
def stopped(world: World) -> Path:
    """2 processes, 0 -> K with ``--stop-at-step K``; returns a pristine copy of its workdir (copy before use)."""
    workdir = world.root / "stopped"
    p = world.launch(workdir, *EVERY, stop_at=K, name="stopped")
    rc = p.wait()
    assert rc == 0, f"--stop-at-step {K} run failed ({rc})\n{p.tail()}"
    assert mplib.committed_steps(workdir) == [2, K], mplib.step_dirs(workdir)
    assert sorted(mplib.last_losses(workdir)) == list(range(1, K + 1))
    meta = mplib.ckpt_meta(workdir, K)
    assert (meta["process_count"], meta["device_count"], meta["data"]["offset"]) == (2, 4, 0), meta
    assert_iterators_at(workdir, K, K)
    return workdir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_bit_identical(workdir: Path, ref: Reference, context: str) -> None:
    """Every logged loss (re-logged steps too) and every array of the final checkpoint equal the reference."""
    rows = mplib.rows(workdir)
    wrong = [(r["step"], r["loss"], ref.losses.get(r["step"])) for r in rows if r["loss"] != ref.losses.get(r["step"])]
    assert not wrong, f"{context}: losses differ from the uninterrupted run (step, got, want): {wrong}"
    assert sorted({r["step"] for r in rows}) == list(range(1, N + 1)), f"{context}: steps logged {rows}"
    assert N in mplib.committed_steps(workdir), f"{context}: no final checkpoint; have {mplib.step_dirs(workdir)}"
    got = mplib.restore_arrays(workdir / "checkpoints" / str(N) / "state")
    assert sorted(got) == sorted(ref.state), set(got) ^ set(ref.state)
    diff = [k for k, v in ref.state.items() if got[k].dtype != v.dtype or not np.array_equal(got[k], v)]
    assert not diff, f"{context}: final arrays differ from the uninterrupted run: {diff}"


def assert_iterators_at(workdir: Path, step: int, next_index: int) -> None:
    """Both processes saved their Grain iterator in checkpoint ``step``, at global batch ``next_index``."""
    data = workdir / "checkpoints" / str(step) / "data"
    for rank in range(2):
        state = json.loads((data / f"process_{rank}-of-2.json").read_text())
        assert state["next_index"] == next_index, (rank, state, sorted(p.name for p in data.iterdir()))


def assert_no_traceback(p: Proc) -> None:
    assert "Traceback (most recent call last)" not in p.output(), p.tail()


# -- 1. stop everything, relaunch ----------------------------------------------------------------------------


def test_stop_and_relaunch_is_bit_identical(world: World, ref: Reference, stopped: Path, tmp_path: Path) -> None:
    workdir = _copy(stopped, tmp_path / "w")
    p = world.launch(workdir, *EVERY, name="relaunch")
    rc = p.wait()
    assert rc == 0, p.tail()
    out = p.output()
    assert mplib.resumed_from(out) == K, p.tail()
    assert f"data iterator restored {K}" in out, p.tail()  # same topology: Grain's own state is used
    assert_no_traceback(p)
    assert_bit_identical(workdir, ref, f"stopped at {K}, relaunched")
    print(f"\nreference run {ref.seconds:.1f}s, relaunch {p.t_exit - p.t0:.1f}s")


# -- 2. other topologies -----------------------------------------------------------------------------------


def test_fsdp_over_both_processes_each_writes_its_own_stores(world: World, tmp_path: Path) -> None:
    """Params split over the devices of both processes: each process writes its shards into several OCDBT
    stores of its own, and plain Orbax and jaxckpt.fastread read the merged checkpoint to the same bytes."""
    workdir = tmp_path / "fsdp4"
    p = world.launch(workdir, "mesh.data=1", "mesh.fsdp=4", "train.steps=2", name="fsdp4")
    rc = p.wait()
    assert rc == 0, p.tail()
    state_dir = workdir / "checkpoints" / "2" / "state"
    stores = set(mplib.ocdbt_stores(state_dir))
    assert {"ocdbt.process_0s1", "ocdbt.process_1s1"} <= stores, stores
    orbax, fast = mplib.restore_arrays(state_dir), mplib.fast_restore_arrays(state_dir)
    assert orbax.keys() == fast.keys() and any(k.startswith("['params']") for k in orbax)
    different = [k for k in orbax if orbax[k].dtype != fast[k].dtype or orbax[k].tobytes() != fast[k].tobytes()]
    assert not different, different


TOPOLOGIES = {
    "1proc-4dev": (4, ()),  # same mesh shape (data=4), one process
    "1proc-2dev-fsdp2": (2, ("mesh.data=1", "mesh.fsdp=2")),  # another device count and mesh
}


@pytest.fixture(scope="module")
def other_topologies(world: World, stopped: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proc]:
    """Resume the stopped 2-process run in one process, on each topology (run side by side)."""
    base = tmp_path_factory.mktemp("topologies")
    procs = {name: world.single(_copy(stopped, base / name), devices, *EVERY, *overrides, name=name)
             for name, (devices, overrides) in TOPOLOGIES.items()}
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
        list(pool.map(lambda p: p.wait(), procs.values()))
    return procs


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_resume_on_another_topology_continues_the_data_stream(
        ref: Reference, other_topologies: dict[str, Proc], topology: str) -> None:
    p = other_topologies[topology]
    workdir = Path(p.args[p.args.index("--workdir") + 1])
    assert p.rc == 0, p.tail()
    out = p.output()
    assert mplib.resumed_from(out) == K, p.tail()
    assert f"data stream repositioned at global batch {K}" in out, p.tail()
    assert_no_traceback(p)
    losses = mplib.last_losses(workdir)
    assert sorted(losses) == list(range(1, N + 1)), sorted(losses)
    got = np.array([losses[s] for s in range(K + 1, N + 1)])
    want = np.array([ref.losses[s] for s in range(K + 1, N + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{topology}: losses after resuming at {K}")
    meta = mplib.ckpt_meta(workdir, N)
    devices, _ = TOPOLOGIES[topology]
    assert (meta["process_count"], meta["device_count"]) == (1, devices), meta
    final = mplib.restore_arrays(workdir / "checkpoints" / str(N) / "state")
    for k, v in ref.state.items():
        np.testing.assert_allclose(final[k], v, rtol=1e-4, atol=1e-5, err_msg=f"{topology}: final {k}")


# -- 3 and 4. one process hurt: SIGTERM, then (resumed) SIGKILL, then resumed to the end ------------------
# One chain in one workdir, to pay for fewer 2-process start-ups: launch -> SIGTERM to process 1 -> resume
# with two hand-started processes -> SIGKILL process 1 -> relaunch to N.


@dataclass
class Preempted:
    launch: Proc
    workdir: Path
    step: int  # the step every process reported saving


@dataclass
class Crashed:
    survivor: Proc
    victim: Proc
    killed_after: int  # last logged step when process 1 was killed
    fail_s: float  # seconds from the SIGKILL until process 0 exited
    committed: list[int]  # steps with a manifest once both were gone


@pytest.fixture(scope="module")
def preempted(world: World, tmp_path_factory: pytest.TempPathFactory) -> Preempted:
    """A fresh 2-process launch; SIGTERM to process 1 (only) as soon as step 1 is logged."""
    workdir = tmp_path_factory.mktemp("hurt") / "w"
    p = world.launch(workdir, *EVERY, name="sigterm")
    victim = p.rank(1)
    # After step 1 everything is compiled; the remaining steps (saves every 2) leave the preemption
    # sync point plenty of room before step N.
    assert p.wait_for(lambda: mplib.n_rows(workdir) >= 1), f"run ended before step 1\n{p.tail()}"
    victim.send_signal(signal.SIGTERM)
    p.wait()
    steps = {int(s) for _, s in PREEMPTED.findall(p.output())}
    return Preempted(p, workdir, steps.pop() if len(steps) == 1 else -1)


@pytest.fixture(scope="module")
def crashed(world: World, preempted: Preempted) -> Crashed:
    """Resume the preempted run by hand (two ``train --coordinator``), SIGKILL process 1 after a new checkpoint."""
    workdir = preempted.workdir
    assert preempted.launch.rc == 143 and preempted.step > 0, preempted.launch.tail()
    p0, p1 = world.manual(workdir, *EVERY, port=free_port(), name="sigkill")

    def armed() -> bool:
        return max(mplib.committed_steps(workdir), default=0) > preempted.step and mplib.n_rows(workdir) > 0

    assert p0.wait_for(armed), f"run ended before a new committed checkpoint\n{p0.tail()}\n{p1.tail()}"
    assert p1.poll() is None, p1.tail()
    at = max(r["step"] for r in mplib.rows(workdir))
    p1.kill_group(signal.SIGKILL)
    t_kill = time.monotonic()
    assert p1.wait(30) == -signal.SIGKILL
    p0.wait(FAIL_FAST_BOUND_S + 60)
    return Crashed(p0, p1, at, p0.t_exit - t_kill, mplib.committed_steps(workdir))


@pytest.fixture(scope="module")
def finished(world: World, crashed: Crashed, preempted: Preempted) -> Proc:
    """The same launch command as the first one, after the crash: continues to N."""
    p = world.launch(preempted.workdir, *EVERY, name="after-crash")
    p.wait()
    return p


def test_sigterm_to_one_process_saves_same_step_everywhere_and_exits_143(preempted: Preempted) -> None:
    p, workdir = preempted.launch, preempted.workdir
    out = p.output()
    assert p.rc == 143, f"launcher exit {p.rc}\n{p.tail()}"
    stops = PREEMPTED.findall(out)
    assert len(stops) == 2 and preempted.step > 0, f"want one 'preempted' line per process, same step: {stops}"
    assert "killing the remaining processes" not in out, p.tail()  # both exited by themselves
    assert preempted.step < N, preempted.step
    logged = max(r["step"] for r in mplib.rows(workdir))
    assert logged == preempted.step, f"checkpoint at {preempted.step} but last logged step {logged}"
    assert mplib.committed_steps(workdir)[-1] == preempted.step, mplib.step_dirs(workdir)
    assert mplib.step_dirs(workdir) == mplib.committed_steps(workdir), "a step without its manifest was left"
    assert mplib.ckpt_meta(workdir, preempted.step)["step"] == preempted.step
    assert_iterators_at(workdir, preempted.step, preempted.step)  # every process saved the same step
    assert_no_traceback(p)
    print(f"\nSIGTERM to process 1 after step 1: both processes saved step {preempted.step} and exited 143")


def test_sigterm_resume_continues_from_the_preemption_step(ref: Reference, preempted: Preempted,
                                                            crashed: Crashed) -> None:
    out = crashed.survivor.output()
    assert mplib.resumed_from(out) == preempted.step, crashed.survivor.tail()
    assert f"data iterator restored {preempted.step}" in out, crashed.survivor.tail()
    # Every loss the resumed processes logged before the crash equals the uninterrupted run's.
    rows = mplib.rows(preempted.workdir)
    after = [(r["step"], r["loss"]) for r in rows if preempted.step < r["step"] <= crashed.killed_after]
    assert after, rows
    assert all(loss == ref.losses[s] for s, loss in after), [(s, x, ref.losses[s]) for s, x in after]


def test_sigkill_of_one_process_fails_the_other_fast(crashed: Crashed) -> None:
    p0 = crashed.survivor
    assert p0.rc != 0, f"process 0 exited 0 after its peer was killed\n{p0.tail()}"
    assert crashed.fail_s < FAIL_FAST_BOUND_S, f"process 0 needed {crashed.fail_s:.1f}s to fail\n{p0.tail()}"
    assert crashed.committed, mplib.step_dirs(Path(p0.args[p0.args.index("--workdir") + 1]))
    print(f"\nSIGKILL of process 1 after step {crashed.killed_after}: process 0 exited {p0.rc} after "
          f"{crashed.fail_s:.1f}s (heartbeat timeout {HEARTBEAT_S}s); committed {crashed.committed}")


def test_after_sigterm_and_sigkill_the_run_resumes_bit_identical(
        ref: Reference, preempted: Preempted, crashed: Crashed, finished: Proc) -> None:
    assert finished.rc == 0, finished.tail()
    assert mplib.resumed_from(finished.output()) == crashed.committed[-1], (crashed.committed, finished.tail())
    assert_no_traceback(finished)
    assert_bit_identical(preempted.workdir, ref,
                         f"SIGTERM at {preempted.step}, SIGKILL after {crashed.killed_after}, relaunched")


# -- 5. nothing left behind ----------------------------------------------------------------------------


def test_every_run_used_and_released_a_coordinator_port(world: World, ref: Reference) -> None:
    """The port checks after each test are not vacuous: every 2-process run recorded its coordinator port."""
    multi = [p for p in mplib.started() if p.args[0] == "launch" or "--coordinator" in p.args]
    assert multi, [p.name for p in mplib.started()]  # at least the reference run
    assert all(p.ports for p in multi), {p.name: p.ports for p in multi}
    assert mplib.ports_used() == set().union(*(p.ports for p in multi))
    assert not mplib.busy_ports(), mplib.busy_ports()
