"""jaxckpt.checkpoint.SaveStart: a save returns once the state's bytes are on the host, and what it
writes is the state, data position and meta as of that moment, whatever the caller does next."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxckpt import checkpoint as ckpt_lib
from jaxckpt import d2h
from jaxckpt.checkpoint import Checkpointer, FrozenIterator, SaveStart, starts_in_background
from jaxckpt.config import CheckpointConfig
from jaxckpt.errors import CheckpointSaveError


def host_state(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((16, 8), np.float32), "b": rng.standard_normal((8,), np.float32),
            "step": np.int32(step)}


def on_devices(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Sharded over 8 devices as a train state is: split on both axes, on one, replicated."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    specs = {"w": P("a", "b"), "b": P("b"), "step": P()}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}


def abstract_of(state: dict[str, jax.Array]) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}


def iterator() -> Any:
    return iter(grain.MapDataset.range(100).to_iter_dataset())


class Gate:
    """Holds the manager's save call until the test opens it; counts the threads it ran on."""

    def __init__(self, manager: Any, fail: BaseException | None = None):
        self.opened, self.threads, self.fail, self.save = threading.Event(), [], fail, manager.save
        manager.save = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        assert self.opened.wait(60), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return self.save(*args, **kwargs)


@pytest.mark.parametrize("pinned", [False, True], ids=["host", "pinned-host"])
def test_the_save_writes_the_state_as_of_its_return(tmp_path: Path, pinned: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The arrays deleted, the iterator moved on and meta changed before Orbax's save call even begins:
    the checkpoint still holds the bits, data position and meta of the moment save() returned. Also with
    host copies into pinned memory, which Orbax asks for on GPUs (there it read the donated arrays)."""
    monkeypatch.setattr(d2h, "pinned_by_default", lambda: pinned)
    host = host_state(3)
    state, it = on_devices(host), iterator()
    target = abstract_of(state)
    for _ in range(7):
        next(it)
    meta = {"step": 3, "metrics": {"loss": 1.5}}
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(keep_latest=5)) as ckpt:
        gate = Gate(ckpt.manager)
        ckpt.save(3, state, it, meta)
        assert ckpt._pending is not None and ckpt._pending.start is not None
        for x in state.values():
            x.delete()
        next(it), next(it)
        meta["metrics"]["loss"] = 99.0
        gate.opened.set()
        ckpt.wait()
        assert gate.threads == ["jaxckpt-save-start"]
        assert ckpt.complete_steps() == [3]
        assert ckpt.meta(3)["metrics"] == {"loss": 1.5}
        it2 = iterator()
        restored = ckpt.restore(3, target, it2)
    assert next(it2) == 7
    for k, v in host.items():
        assert restored[k].sharding == target[k].sharding
        assert np.asarray(restored[k]).tobytes() == np.asarray(v).tobytes()
    assert not d2h._SNAPSHOTS  # the host copies were let go


@pytest.mark.parametrize("on_error", ["raise", "continue"])
def test_an_error_in_orbax_save_call_is_reported_at_the_next_wait(tmp_path: Path, on_error: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """save() has returned by the time Orbax fails: wait() reports it as a failed save of that step (the
    same message as a failure on the caller's thread), and the committed checkpoint stays."""
    cfg = CheckpointConfig(keep_latest=5, on_save_error=on_error)
    with Checkpointer(tmp_path / "ckpt", cfg) as ckpt:
        ckpt.save(1, on_devices(host_state(1)), iterator(), {"step": 1})
        ckpt.wait()
        gate = Gate(ckpt.manager, fail=OSError(errno.ENOSPC, "No space left on device"))
        ckpt.save(2, on_devices(host_state(2)), iterator(), {"step": 2})  # does not raise: not failed yet
        gate.opened.set()
        if on_error == "raise":
            with pytest.raises(CheckpointSaveError, match=r"checkpoint 2 .* the disk is full.* \[1\] are intact"):
                ckpt.wait()
        else:
            ckpt.wait()
            assert "WARNING: saving checkpoint 2" in capsys.readouterr().err
        assert ckpt._pending is None and ckpt.complete_steps() == [1]
        assert not d2h._SNAPSHOTS
        ckpt.manager.save = gate.save
        ckpt.save(3, on_devices(host_state(3)), iterator(), {"step": 3})  # the next save works
        ckpt.wait()
        assert ckpt.complete_steps() == [1, 3]


def test_frozen_iterator_is_saved_as_grain_saves_the_iterator(tmp_path: Path) -> None:
    """Grain's CheckpointHandler writes the same file for the iterator and for its FrozenIterator."""
    it = iterator()
    for _ in range(5):
        next(it)
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "real").mkdir()
    (tmp_path / "frozen").mkdir()
    frozen = FrozenIterator(it)
    handler.save(tmp_path / "real", args=grain.checkpoint.CheckpointSave(it))
    next(it)  # moving on does not change what the frozen state writes
    handler.save(tmp_path / "frozen", args=grain.checkpoint.CheckpointSave(frozen))
    (real,) = (tmp_path / "real").iterdir()
    assert (tmp_path / "frozen" / real.name).read_text() == real.read_text()
    assert json.loads(real.read_text())["next_index"] == 5


def test_only_whole_jax_array_trees_on_one_process_start_in_background(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Numpy leaves (the caller may change them) and typed PRNG keys (Orbax makes a new array of them)
    are not in a snapshot, and several processes synchronise inside Orbax's save: those save on the
    caller's thread, as before."""
    state = on_devices(host_state(1))
    assert starts_in_background(state)
    assert not starts_in_background({**state, "n": np.zeros(3, np.float32)})
    assert not starts_in_background({**state, "key": jax.random.key(0)})
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig()) as ckpt:
        ckpt.save(1, {**state, "n": np.arange(3, dtype=np.float32)}, iterator(), {"step": 1})
        assert ckpt._pending.start is None
        ckpt.wait()
        assert ckpt.complete_steps() == [1]
    monkeypatch.setattr(ckpt_lib.distributed, "is_multiprocess", lambda: True)
    assert not starts_in_background(state)


def test_save_start_hands_the_snapshot_to_orbax_and_lets_it_go(tmp_path: Path) -> None:
    """SaveStart on its own (the benchmark's path): done() and join() around Orbax's save call."""
    host = host_state(4)
    state = on_devices(host)
    manager = ckpt_lib.make_manager(tmp_path / "ckpt")
    gate = Gate(manager)
    start = SaveStart(manager, 4, ckpt_lib.ocp.args.Composite(state=ckpt_lib.ocp.args.PyTreeSave(state)), state)
    assert not start.done() and len(d2h._SNAPSHOTS) == len(host)
    gate.opened.set()
    start.join()
    manager.wait_until_finished()
    assert start.done() and start.error is None and not d2h._SNAPSHOTS
    assert manager.all_steps() == [4]
    manager.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread priorities are Linux's")  # CI: Linux
def test_a_sandbox_that_forbids_sched_idle_leaves_the_save_at_its_nice_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where SCHED_IDLE is refused (a seccomp profile), a save's thread still lowers its nice value and goes on."""
    def refuse(*_: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpt_lib.os, "sched_setscheduler", refuse)
    out: list[tuple[bool, int, int]] = []
    t = threading.Thread(target=lambda: out.append((ckpt_lib.lower_this_thread(19, idle=True),
                                                    os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0))))
    t.start()
    t.join()
    assert out == [(True, 19, os.SCHED_OTHER)]


def priorities() -> dict[str, list[tuple[int, int]]]:
    """This process's threads' (nice value, scheduling policy), by thread name (``/proc``'s ``comm``)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for tid, name in ckpt_lib.native_threads():
        try:
            out.setdefault(name, []).append((os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)))
        except ProcessLookupError:  # ended meanwhile
            continue
    return out


def raise_tensorstore_workers() -> None:
    """Put TensorStore's workers back at nice 0 and SCHED_OTHER, as a restore before any save leaves them."""
    for tid, name in ckpt_lib.native_threads():  # earlier saves in this process lowered them
        try:
            if name.startswith("ts_"):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except PermissionError:  # only root may raise them again
            pytest.skip("an unprivileged process cannot raise its TensorStore workers back to nice 0 (CI: root)")
        except ProcessLookupError:  # the thread ended meanwhile
            continue


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread priorities are Linux's")  # CI: Linux
@pytest.mark.parametrize(("nice", "idle"), [(19, True), (19, False), (0, True)])
def test_the_save_threads_give_way_to_training(tmp_path: Path, nice: int, idle: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """While Orbax's save call runs, its thread and TensorStore's workers (started here by a save before it,
    at nice 0) are at checkpoint.save_nice, and in SCHED_IDLE with save_idle (unless save_nice is 0); so is
    the manifest's thread. The train loop's thread and XLA's are not."""
    state = on_devices(host_state(1))
    write_manifest, manifest_thread = ckpt_lib.integrity.write_manifest, []
    monkeypatch.setattr(ckpt_lib.integrity, "write_manifest", lambda *a: (
        manifest_thread.append((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0))), write_manifest(*a)))
    seen: list[tuple[tuple[int, int], dict[str, list[tuple[int, int]]]]] = []
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_nice=0)) as ckpt:
        ckpt.save(1, state, iterator(), {})
        ckpt.wait()
    assert priorities().get("ts_pool_worker"), "no TensorStore workers to lower: the test checks nothing"
    raise_tensorstore_workers()
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_nice=nice, save_idle=idle)) as ckpt:
        gate = Gate(ckpt.manager)
        save = gate.save
        gate.save = lambda *a, **k: (seen.append(((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)),
                                                  priorities())), save(*a, **k))[1]
        ckpt.save(2, state, iterator(), {})
        gate.opened.set()
        ckpt.wait()
        assert ckpt.complete_steps() == [1, 2]
    own, threads = seen[0]
    lowered = (nice, os.SCHED_IDLE if idle and nice else os.SCHED_OTHER)
    assert own == lowered
    assert set(threads["ts_pool_worker"]) == {lowered}
    assert manifest_thread[-1] == lowered
    assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)) == (0, os.SCHED_OTHER)  # the train loop
    assert set(sum((v for k, v in threads.items() if k.startswith("tf_")), [])) <= {(0, os.SCHED_OTHER)}
