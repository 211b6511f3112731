"""Save and retention policies (``jaxckpt.policies``) with an injected clock, and retention end to end."""

from __future__ import annotations

import errno
import gc
import math
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from jaxckpt import checkpoint as checkpoint_module
from jaxckpt import gcpause
from jaxckpt.checkpoint import TODELETE, Checkpointer, gc_paused
from jaxckpt.config import CheckpointConfig
from jaxckpt.integrity import MANIFEST
from jaxckpt.policies import EveryNSeconds, EveryNSteps, Retention, SaveSchedule, retention, save_schedule


class FakeClock:
    """A clock the test moves by hand (no sleeping)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def kept(reasons: dict[int, list[str]]) -> list[int]:
    """Steps with at least one reason to stay."""
    return sorted(s for s, why in reasons.items() if why)


# -- save policies ------------------------------------------------------------------------------


def test_every_n_steps_fires_on_multiples_only() -> None:
    p = EveryNSteps(4)
    fired = [s for s in range(0, 17) if p.should_save(s, now=0.0, last_save_step=None, last_save_time=0.0)]
    assert fired == [4, 8, 12, 16]


def test_every_n_seconds_fires_when_time_has_passed() -> None:
    p = EveryNSeconds(60.0)
    assert not p.should_save(5, now=159.9, last_save_step=None, last_save_time=100.0)
    assert p.should_save(5, now=160.0, last_save_step=None, last_save_time=100.0)
    assert not p.should_save(0, now=1e9, last_save_step=None, last_save_time=0.0), "step 0 is never saved"


def test_schedule_every_n_seconds_resets_after_saved() -> None:
    clock = FakeClock()
    sched = SaveSchedule([EveryNSeconds(60.0)], clock)
    assert not sched.should_save(1)
    clock.advance(59.0)
    assert not sched.should_save(2)
    clock.advance(1.0)
    assert sched.should_save(3)
    sched.saved(3)
    assert not sched.should_save(4), "the timer must restart at the save"
    clock.advance(59.5)
    assert not sched.should_save(5)
    clock.advance(0.5)
    assert sched.should_save(6)


def test_schedule_time_counts_from_creation() -> None:
    """A fresh schedule (e.g. after a resume) waits a full interval before its first timed save."""
    clock = FakeClock(5000.0)
    sched = SaveSchedule([EveryNSeconds(30.0)], clock)
    assert not sched.should_save(1)
    clock.advance(30.0)
    assert sched.should_save(2)


def test_schedule_never_saves_the_same_step_twice() -> None:
    clock = FakeClock()
    sched = SaveSchedule([EveryNSteps(2), EveryNSeconds(10.0)], clock)
    assert sched.should_save(4)
    sched.saved(4)
    clock.advance(1000.0)  # both policies would fire for step 4 again
    assert not sched.should_save(4)
    assert sched.should_save(5)  # time-based
    assert sched.last_save_step == 4


def test_schedule_any_policy_fires() -> None:
    clock = FakeClock()
    sched = SaveSchedule([EveryNSteps(100), EveryNSeconds(10.0)], clock)
    assert [s for s in range(1, 8) if sched.should_save(s)] == []
    clock.advance(10.0)
    assert sched.should_save(7)
    sched.saved(7)
    assert sched.should_save(100)


def test_save_schedule_from_config() -> None:
    clock = FakeClock()
    sched = save_schedule(CheckpointConfig(every_steps=3, every_seconds=20.0), clock)
    assert [s for s in range(1, 10) if sched.should_save(s)] == [3, 6, 9]
    clock.advance(20.0)
    assert sched.should_save(10)
    assert save_schedule(CheckpointConfig(every_steps=0, every_seconds=0.0), clock).policies == []


# -- retention ----------------------------------------------------------------------------------


def test_retention_keeps_latest_k() -> None:
    why = Retention(latest=3).reasons([7, 1, 5, 3, 9], {})
    assert set(why) == {1, 3, 5, 7, 9}
    assert kept(why) == [5, 7, 9]
    assert why[1] == [] and why[3] == []
    assert all(any("latest" in r for r in why[s]) for s in (5, 7, 9))


def test_retention_latest_larger_than_steps_keeps_all() -> None:
    assert kept(Retention(latest=5).reasons([2, 4], {})) == [2, 4]
    assert Retention(latest=5).reasons([], {}) == {}


def test_retention_keeps_every_mth_forever() -> None:
    why = Retention(latest=1, every=4).reasons(list(range(1, 14)), {})
    assert kept(why) == [4, 8, 12, 13]
    assert any("every 4" in r for r in why[8])
    assert not any("every" in r for r in why[13])


def test_retention_best_min_mode() -> None:
    metrics = {1: {"eval_loss": 3.0}, 2: {"eval_loss": 1.0}, 3: {"eval_loss": 2.0}, 4: {"eval_loss": 0.5},
               5: {"eval_loss": 9.0}, 6: {"eval_loss": 4.0}}
    why = Retention(latest=1, best=2).reasons(list(range(1, 7)), metrics)
    assert kept(why) == [2, 4, 6]
    assert any("best 2 by eval_loss" in r for r in why[2]) and any("best" in r for r in why[4])
    assert not any("best" in r for r in why[6])


def test_retention_best_max_mode() -> None:
    metrics = {s: {"acc": a} for s, a in zip(range(1, 7), [0.1, 0.9, 0.5, 0.7, 0.2, 0.3], strict=True)}
    why = Retention(latest=1, best=2, metric="acc", mode="max").reasons(list(range(1, 7)), metrics)
    assert kept(why) == [2, 4, 6]
    assert any("best 2 by acc" in r for r in why[2]) and any("best" in r for r in why[4])


def test_retention_best_ignores_steps_without_the_metric() -> None:
    metrics = {1: {"loss": 0.01}, 2: {"eval_loss": 5.0}, 3: {}, 5: {"eval_loss": 4.0}}
    why = Retention(latest=1, best=2).reasons([1, 2, 3, 4, 5, 6], metrics)
    assert kept(why) == [2, 5, 6]
    for s in (1, 3, 4):
        assert why[s] == [], f"step {s} has no eval_loss and must not be kept as best"


def test_retention_best_fewer_scored_than_b() -> None:
    why = Retention(latest=1, best=3).reasons([1, 2, 3, 4], {2: {"eval_loss": 1.0}})
    assert kept(why) == [2, 4]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_retention_best_never_picks_nan(mode: str) -> None:
    """A diverged evaluation (NaN) is not "best": the real best must be kept instead."""
    values = {1: math.nan, 2: 3.0, 3: 1.0, 4: 2.0, 5: 5.0}
    metrics = {s: {"eval_loss": v} for s, v in values.items()}
    why = Retention(latest=1, best=1, mode=mode).reasons(list(values), metrics)
    best = 3 if mode == "min" else 5  # max: 5.0 at step 5 (also the latest)
    assert why[1] == [], f"NaN step kept: {why}"
    assert any("best" in r for r in why[best]), f"true best {best} not kept: {why}"


def test_retention_combination_reasons_accumulate() -> None:
    metrics = {s: {"eval_loss": 10.0 - s} for s in range(1, 13)}
    metrics[3] = {"eval_loss": -5.0}
    why = Retention(latest=2, every=4, best=1).reasons(list(range(1, 13)), metrics)
    assert kept(why) == [3, 4, 8, 11, 12]
    assert len(why[12]) == 2  # latest and every-4
    assert any("latest" in r for r in why[12]) and any("every 4" in r for r in why[12])
    assert why[3] == ["best 1 by eval_loss"]


def test_retention_from_config() -> None:
    cfg = CheckpointConfig(keep_latest=2, keep_every=5, keep_best=1, best_metric="acc", best_mode="max")
    assert retention(cfg) == Retention(latest=2, every=5, best=1, metric="acc", mode="max")


# -- Checkpointer end to end --------------------------------------------------------------------


def _state(step: int) -> dict[str, object]:
    return {"w": jnp.full((4, 3), float(step), jnp.float32), "b": jnp.arange(5, dtype=jnp.int32) + step,
            "step": jnp.asarray(step, jnp.int32)}


def _on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _save_steps(ckpt: Checkpointer, steps: range, metrics: dict[int, dict[str, float]] | None = None) -> object:
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in steps:
        next(it)
        meta = {"step": step, "metrics": (metrics or {}).get(step, {})}
        ckpt.save(step, _state(step), it, meta)
        ckpt.poll()
    ckpt.wait()
    return it


def test_checkpointer_retention_latest_and_every(tmp_path: Path) -> None:
    """keep_latest=2 keep_every=4, async saves of steps 1..9: exactly {4, 8, 9} stay on disk."""
    cfg = CheckpointConfig(keep_latest=2, keep_every=4, async_save=True)
    with Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock()) as ckpt:
        it = _save_steps(ckpt, range(1, 10))
        assert ckpt.steps() == [4, 8, 9]
        assert next(it) == 9  # saving does not move the iterator
    assert _on_disk(tmp_path / "ckpt") == [4, 8, 9]


def test_checkpointer_retention_best_by_metric(tmp_path: Path) -> None:
    """keep_latest=1 keep_best=2: the two lowest eval_loss (among steps that have it) and the newest stay."""
    losses = {1: 5.0, 2: 1.5, 3: 4.0, 4: 2.5, 6: 0.5, 7: 3.0, 8: 9.0}  # step 5 has no eval_loss
    metrics = {s: {"eval_loss": v, "loss": 0.0} for s, v in losses.items()} | {5: {"loss": -100.0}}
    cfg = CheckpointConfig(keep_latest=1, keep_best=2, async_save=True)
    with Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock()) as ckpt:
        _save_steps(ckpt, range(1, 9), metrics)
    assert _on_disk(tmp_path / "ckpt") == [2, 6, 8]


def test_checkpointer_sync_save_applies_retention(tmp_path: Path) -> None:
    cfg = CheckpointConfig(keep_latest=3, async_save=False)
    with Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock()) as ckpt:
        _save_steps(ckpt, range(1, 7))
    assert _on_disk(tmp_path / "ckpt") == [4, 5, 6]


@pytest.mark.parametrize("async_save", [True, False])
def test_dropped_steps_wait_aside_until_the_next_save_starts(tmp_path: Path, async_save: bool) -> None:
    """A step retention drops leaves the step list at once, without its manifest, and waits in TODELETE
    until the next save starts (whose files then reuse its page cache); close() removes the rest."""
    directory = tmp_path / "ckpt"
    trash = directory / TODELETE
    (trash / "7" / "state").mkdir(parents=True)  # an earlier run's, stopped before its next save
    with Checkpointer(directory, CheckpointConfig(keep_latest=1, async_save=async_save), clock=FakeClock()) as ckpt:
        assert not trash.exists()
        _save_steps(ckpt, range(1, 3))
        assert ckpt.steps() == [2] and ckpt.complete_steps() == [2] and _on_disk(directory) == [2]
        assert [p.name for p in trash.iterdir()] == ["1"]
        assert (trash / "1" / "state").is_dir() and not (trash / "1" / MANIFEST).exists()
        _save_steps(ckpt, range(3, 4))  # removes 1 before it writes; its own retention then moves 2
        assert [p.name for p in trash.iterdir()] == ["2"]
        state = ckpt.restore(3, {k: jnp.zeros_like(v) for k, v in _state(0).items()}, None)
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0, np.float32))
    assert not trash.exists() and _on_disk(directory) == [3]


def test_checkpointer_schedule_uses_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = CheckpointConfig(every_steps=0, every_seconds=30.0)
    with Checkpointer(tmp_path / "ckpt", cfg, clock=clock) as ckpt:
        assert not ckpt.should_save(1)
        clock.advance(30.0)
        assert ckpt.should_save(2)
        it = iter(grain.MapDataset.range(10).to_iter_dataset())
        ckpt.save(2, _state(2), it, {"step": 2, "metrics": {}})
        assert not ckpt.should_save(3)
        clock.advance(30.0)
        assert ckpt.should_save(3)


def test_checkpointer_restore_after_retention(tmp_path: Path) -> None:
    """A kept step restores its arrays and the data iterator position."""
    cfg = CheckpointConfig(keep_latest=2, keep_every=4)
    with Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock()) as ckpt:
        _save_steps(ckpt, range(1, 10))
    with Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock()) as ckpt:
        abstract = {k: jnp.zeros_like(v) for k, v in _state(0).items()}
        it = iter(grain.MapDataset.range(100).to_iter_dataset())
        state = ckpt.restore(4, abstract, it)
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 4.0, np.float32))
        np.testing.assert_array_equal(np.asarray(state["b"]), np.arange(5) + 4)
        assert next(it) == 4


def test_retention_latest_zero_keeps_nothing_by_recency() -> None:
    """latest=0 is 'no recency rule' (a slice of [-0:] would have kept everything)."""
    why = Retention(latest=0, every=2).reasons([1, 2, 3, 4], {})
    assert kept(why) == [2, 4]


@pytest.mark.parametrize("enabled_before", [True, False])
def test_gc_paused_restores_the_collector_state(enabled_before: bool) -> None:
    """The save's GC pause disables collection inside and leaves it as it found it, also on an error."""
    (gc.enable if enabled_before else gc.disable)()
    try:
        with pytest.raises(RuntimeError), gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("save failed")
        assert gc.isenabled() is enabled_before
    finally:
        gc.enable()


def test_overlapping_pauses_keep_the_collector_off_until_the_last_ends() -> None:
    """The blocking part's pause (train thread) and the shard writes' (Orbax's thread) overlap: the first to
    end must not turn collection back on under the other."""
    entered, release = threading.Event(), threading.Event()

    def writes() -> None:
        with gcpause.paused():
            entered.set()
            release.wait(10)

    gc.enable()
    other = threading.Thread(target=writes)
    try:
        with gc_paused():
            other.start()
            assert entered.wait(10)
        assert not gc.isenabled()  # the writes' pause is still on
        release.set()
        other.join(10)
        assert gc.isenabled()
    finally:
        release.set()
        gc.enable()


class Node:
    """An object that can sit in a reference cycle (only the cyclic collector frees those)."""

    other: object = None


def cycle() -> weakref.ref:
    """A weak reference to one of two objects that only refer to each other: garbage for the cyclic collector."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def manual_gc() -> Iterator[None]:
    """Only explicit gc.collect() calls collect, so that garbage made by a test waits for the test's own."""
    gc.disable()
    yield
    gc.enable()


def test_freeze_exempts_what_is_alive_from_collection_until_thaw(manual_gc: None) -> None:
    """A full collection during a save walks only what the save allocated; after thaw() the rest is collected
    again, and a freeze the process made itself is left alone."""
    garbage = cycle()
    gcpause.freeze()
    try:
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert garbage() is not None, "a frozen object was collected"
        young = cycle()
        gc.collect()
        assert young() is None, "what was allocated after the freeze is collected as usual"
    finally:
        gcpause.thaw()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert garbage() is None
    gc.freeze()  # the process's own, e.g. before forking workers
    try:
        theirs = gc.get_freeze_count()
        assert theirs > 0
        gcpause.freeze()
        gcpause.thaw()
        assert gc.get_freeze_count() == theirs
    finally:
        gc.unfreeze()


def test_the_start_up_pause_is_one_pause_and_ends_with_what_it_left_alive_frozen() -> None:
    """``jaxckpt train`` begins it before its imports and ``trainer.train`` again at its entry: one pause, which
    one end lifts. What start-up left alive is then exempt from collection until a thaw."""
    gc.enable()
    before = gc.get_freeze_count()
    try:
        gcpause.begin_start_up()
        gcpause.begin_start_up()
        assert not gc.isenabled()
        garbage = cycle()
        gcpause.end_start_up()
        assert gc.isenabled() and gc.get_freeze_count() > before
        gc.collect()
        assert garbage() is not None, "start-up's objects were not frozen"
        gcpause.end_start_up()  # the trainer's own end, after the first step's: nothing left to do
        assert gc.isenabled()
        gcpause.thaw()
        gc.collect()
        assert garbage() is None
    finally:
        gcpause.thaw()
        gc.enable()


def test_the_start_up_pause_keeps_the_callers_settings_and_other_pauses() -> None:
    """A start-up that fails ends without freezing; a caller's own gc.disable() outlives the pause, and a
    save's pause that began during start-up keeps collection off until it ends."""
    gc.disable()
    before = gc.get_freeze_count()
    try:
        gcpause.begin_start_up()
        gcpause.end_start_up(freeze_alive=False)
        assert not gc.isenabled() and gc.get_freeze_count() == before
        gc.enable()
        gcpause.begin_start_up()
        with gc_paused():
            gcpause.end_start_up(freeze_alive=False)
            assert not gc.isenabled(), "the save's pause is still on"
        assert gc.isenabled() and gc.get_freeze_count() == before
    finally:
        gcpause.end_start_up(freeze_alive=False)
        gc.enable()


def test_a_save_keeps_the_freeze_until_it_completes_or_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             manual_gc: None) -> None:
    cfg = CheckpointConfig(async_save=True, on_save_error="continue")
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    with Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock()) as ckpt:
        garbage = cycle()
        ckpt.save(1, _state(1), it, {"step": 1})
        assert ckpt._pending is not None
        gc.collect()
        assert garbage() is not None, "not frozen while the save is in flight"
        ckpt.wait()
        assert ckpt.complete_steps() == [1] and gc.get_freeze_count() == 0
        gc.collect()
        assert garbage() is None

        def full_disk(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoint_module, "SaveStart", full_disk)
        ckpt.save(2, _state(2), it, {"step": 2})
        assert ckpt._pending is None and gc.get_freeze_count() == 0
        assert ckpt.complete_steps() == [1]


def test_a_failed_saves_files_written_after_the_failure_are_removed_at_close(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """One array's error does not stop Orbax's other writes: files of the failed step that appear after
    _failed cleaned up (here: while the manager closes) are removed once Orbax's threads have stopped."""
    cfg = CheckpointConfig(async_save=True, on_save_error="continue")
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = Checkpointer(tmp_path / "ckpt", cfg, clock=FakeClock())
    ckpt.save(1, _state(1), it, {"step": 1})
    ckpt.wait()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "SaveStart", full_disk)
    ckpt.save(2, _state(2), it, {"step": 2})
    close = ckpt.manager.close
    late = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234" / "state"

    def close_while_a_writer_finishes() -> None:
        late.mkdir(parents=True)
        (late / "d").write_bytes(b"late shard")
        close()

    monkeypatch.setattr(ckpt.manager, "close", close_while_a_writer_finishes)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]
