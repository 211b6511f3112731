"""jaxckpt.pacing: a periodic save beside CPU training writes its arrays in timed windows; waiting lifts it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_determinism import TINY
from test_policies import FakeClock
from test_resume import load_state
from test_save_start import iterator

from jaxckpt import checkpoint as ckpt_lib
from jaxckpt import pacing
from jaxckpt.checkpoint import Checkpointer
from jaxckpt.config import CheckpointConfig, load_config
from jaxckpt.pacing import WritePacer
from jaxckpt.trainer import train

MB = 1_000_000


class FakeTime(FakeClock):
    """A FakeClock that its async sleep moves; ``on_sleep`` runs at each sleep (to lift a pacer mid-wait)."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.on_sleep = lambda: None

    async def sleep(self, dt: float) -> None:
        self.advance(dt)
        self.on_sleep()


def admitted_at(pacer: WritePacer, fake: FakeTime, sizes: list[int]) -> list[float]:
    """When each request (in order, each after the one before is admitted) gets through."""
    async def run() -> list[float]:
        out = []
        for n in sizes:
            await pacer.wait_for_bytes(n)
            out.append(round(fake.t, 6))
        return out
    return asyncio.run(run())


def test_writes_are_admitted_in_windows_of_rate_times_period() -> None:
    fake = FakeTime()
    pacer = WritePacer(8, period_s=1.0, clock=fake, sleep=fake.sleep)  # 8 MB per 1 s window
    # The first window opens one period after the first request; four requests fit in it.
    assert admitted_at(pacer, fake, [2 * MB] * 5) == [1.0, 1.0, 1.0, 1.0, 2.0]
    assert pacer.windows == 2


def test_a_large_write_gets_a_window_of_its_own_and_keeps_the_average_rate() -> None:
    fake = FakeTime()
    pacer = WritePacer(8, period_s=1.0, clock=fake, sleep=fake.sleep)
    # 6 MB each: two never share a window. 30 MB takes a window alone, and the next opens 30/8 s later.
    assert admitted_at(pacer, fake, [6 * MB, 6 * MB, 30 * MB, 1 * MB]) == [1.0, 2.0, 3.0, 6.75]


def test_a_waiting_write_sleeps_once_until_its_window_opens() -> None:
    """No polling: with every array of a save waiting from the start, periodic wake-ups took CPU from the
    train steps beside it."""
    fake, naps = FakeTime(), []

    async def sleep(dt: float) -> None:
        naps.append(round(dt, 6))
        await fake.sleep(dt)

    pacer = WritePacer(8, period_s=1.0, clock=fake, sleep=sleep)
    assert admitted_at(pacer, fake, [2 * MB] * 5 + [30 * MB]) == [1.0, 1.0, 1.0, 1.0, 2.0, 3.0]
    assert naps == [1.0, 1.0, 1.0]  # three writes found their window not yet open; the others went at once


def test_lift_lets_the_writes_still_to_come_through_at_once() -> None:
    fake = FakeTime()
    pacer = WritePacer(1, period_s=10.0, clock=fake, sleep=fake.sleep)
    assert admitted_at(pacer, fake, [10 * MB]) == [10.0]
    pacer.lift()
    assert admitted_at(pacer, fake, [10 * MB, 50 * MB]) == [10.0, 10.0]  # their windows would open at 20 s, 30 s


def test_lift_wakes_a_waiting_write_from_another_thread() -> None:
    """The next save, a preemption or the end of training lifts the pace from the train thread while the
    writes wait on Orbax's event loop."""
    pacer = WritePacer(1, period_s=60.0)  # the first window opens a minute after the request
    admitted = threading.Event()
    writer = threading.Thread(target=lambda: (asyncio.run(pacer.wait_for_bytes(MB)), admitted.set()), daemon=True)
    writer.start()
    time.sleep(0.3)
    assert not admitted.is_set()
    pacer.lift()
    assert admitted.wait(10), "lift() did not wake the write waiting for its window"
    writer.join()
    assert not pacer._wakers


def test_a_pace_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        WritePacer(0)


def one_device_state(step: int) -> dict[str, jax.Array]:
    """Four 250 KB arrays (1 MB), one shard each: one write request per array."""
    rng = np.random.default_rng(step)
    return {f"a{i}": jax.device_put(rng.standard_normal((250, 250), np.float32)) for i in range(4)}


def check_reads_back(ckpt: Checkpointer, workdir: Path, step: int, state: dict[str, jax.Array]) -> None:
    """Bit for bit, through the Checkpointer and through plain Orbax (``test_resume.load_state``)."""
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
    restored = ckpt.restore(step, abstract, None)
    plain = load_state(workdir, step)
    for k, v in state.items():
        assert np.asarray(restored[k]).tobytes() == np.asarray(v).tobytes()
        assert plain[f"['{k}']"].tobytes() == np.asarray(v).tobytes()


def test_a_paced_save_writes_in_windows_and_reads_back_bit_for_bit(tmp_path: Path) -> None:
    """1 MB at 1 MB/s in 0.5 s windows of 0.5 MB: two arrays per window. Polled to completion as the train
    loop does, not waited on."""
    state = one_device_state(1)
    with Checkpointer(tmp_path / "checkpoints", CheckpointConfig(write_mb_s=1.0)) as ckpt:
        ckpt.save(1, state, iterator(), {"step": 1}, paced=True)
        pacer = ckpt._pending.pacer
        assert pacer is not None
        while ckpt._pending is not None:  # as the train loop does between steps
            time.sleep(0.05)
            ckpt.poll()
        assert not pacer.lifted and pacer.windows == 2
        assert ckpt.complete_steps() == [1]
        check_reads_back(ckpt, tmp_path, 1, state)


def test_waiting_for_a_paced_save_lifts_the_pace(tmp_path: Path) -> None:
    """At 1 KB/s the save would take ~12 min (each window opens 250 s after the one before); wait() (the
    next save, a preemption, the end of training) lifts the pace."""
    state = one_device_state(2)
    with Checkpointer(tmp_path / "checkpoints", CheckpointConfig(write_mb_s=0.001)) as ckpt:
        ckpt.save(2, state, iterator(), {"step": 2}, paced=True)
        pacer = ckpt._pending.pacer
        waiter = threading.Thread(target=ckpt.wait)
        waiter.start()
        waiter.join(timeout=300)
        lifted_by_wait = not waiter.is_alive()
        pacer.lift()  # so that a failure here still lets the save end
        waiter.join()
        assert lifted_by_wait, "wait() did not lift the pace"
        assert pacer.lifted and ckpt.complete_steps() == [2]
        check_reads_back(ckpt, tmp_path, 2, state)


def test_only_saves_beside_training_on_the_cpu_backend_are_paced(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with Checkpointer(tmp_path / "a", CheckpointConfig(write_mb_s=16.0)) as ckpt:
        assert ckpt.pacer_for(paced=False) is None
        pacer = ckpt.pacer_for(paced=True)
        assert pacer is not None and pacer.rate == 16 * MB and pacer.burst == 8 * MB
        monkeypatch.setattr(pacing, "shares_cores", lambda: False)  # an accelerator trains; the host's cores are free
        assert ckpt.pacer_for(paced=True) is None
    with Checkpointer(tmp_path / "b", CheckpointConfig(write_mb_s=0.0)) as ckpt:
        assert ckpt.pacer_for(paced=True) is None


def test_the_trainer_paces_its_periodic_saves_and_not_the_last(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, bool]] = []
    save = ckpt_lib.Checkpointer.save

    def spy(self: Checkpointer, step: int, *args: object, paced: bool = False) -> float:
        calls.append((step, paced))
        return save(self, step, *args, paced=paced)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", spy)
    cfg = load_config(None, [*TINY, "train.steps=4", "checkpoint.every_steps=2", "train.eval_every=0",
                             "train.progress=false", "train.tensorboard=false", "train.compilation_cache="])
    train(cfg, tmp_path / "run")
    assert calls == [(2, True), (4, False)]
