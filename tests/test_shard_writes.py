"""jaxckpt.shard_writes: a lean save writes each array's shards with one reservation and the writes
started together, the same bytes to the same places; every other save keeps Orbax's per-shard coroutines."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from orbax.checkpoint._src.serialization import limits
from orbax.checkpoint._src.serialization import serialization as orbax_ser
from test_d2h import _save, arrays, assert_install_keeps, assert_same_arrays, named_arrays, orbax_read

from jaxckpt import d2h, pacing, shard_writes
from jaxckpt.checkpoint import make_manager


class Recording(limits.LimitInFlightBytes):
    """Orbax's byte limiter, noting every reservation asked of it."""

    def __init__(self, max_bytes: int = 1 << 40):
        super().__init__(max_bytes)
        self.asked: list[int] = []
        self.gc_enabled: list[bool] = []  # whether cyclic collection was on at each reservation

    async def wait_for_bytes(self, requested_bytes: int) -> None:
        self.asked.append(requested_bytes)
        self.gc_enabled.append(gc.isenabled())
        await super().wait_for_bytes(requested_bytes)


def test_groups_stay_below_max_bytes_and_a_too_large_item_stands_alone() -> None:
    assert list(shard_writes.groups([3, 3, 3], None)) == [slice(0, 3)]
    assert list(shard_writes.groups([3, 3, 3], 7)) == [slice(0, 2), slice(2, 3)]
    assert list(shard_writes.groups([3, 3, 3], 6)) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert list(shard_writes.groups([9, 1, 1], 5)) == [slice(0, 1), slice(1, 3)]
    assert list(shard_writes.groups([], 5)) == []


def _spec(x: jax.Array, path: Path, chunk_shape: tuple[int, ...]) -> dict[str, Any]:
    """A zarr3 TensorStore spec for ``x`` at ``path``, as Orbax hands it to async_serialize_from_host."""
    grid = {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}}
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "dtype": x.dtype.name,
            "metadata": {"shape": list(x.shape), "data_type": x.dtype.name, "chunk_grid": grid}}


def _opened(spec: dict[str, Any]) -> ts.TensorStore:
    """The array ``spec`` names, opened from what is on disk (its metadata as written)."""
    return ts.open({k: v for k, v in spec.items() if k != "metadata"}).result()


def _write(x: jax.Array, path: Path, limiter: limits.ByteLimiter) -> np.ndarray:
    """``x``'s replica-0 shards through Orbax's (installed) async_serialize_from_host; what the file holds."""
    rslices = d2h.transfer([x], 0)[0]
    spec = _spec(x, path, rslices.local_shape)
    asyncio.run(orbax_ser.async_serialize_from_host(rslices, spec, byte_limiter=limiter))
    return _opened(spec).read().result()


def test_a_marked_limiter_is_asked_once_per_array_an_unmarked_one_per_shard(tmp_path: Path) -> None:
    assert shard_writes.install()
    x = arrays()[0]  # 8 shards of 64 bytes
    marked, unmarked = Recording(), Recording()
    shard_writes.mark([marked])
    ours, theirs = _write(x, tmp_path / "ours", marked), _write(x, tmp_path / "theirs", unmarked)
    assert marked.asked == [x.nbytes]
    assert unmarked.asked == [x.nbytes // 8] * 8  # Orbax's own coroutine per shard
    assert marked.gc_enabled == [False] and gc.isenabled()  # paused while the array is written, then back
    assert ours.tobytes() == theirs.tobytes() == np.asarray(x).tobytes()


def test_below_a_limiters_max_bytes_an_array_is_written_in_several_groups(tmp_path: Path) -> None:
    x = arrays()[0]
    small = Recording(max_bytes=x.nbytes // 2)  # 3 shards of 64 bytes stay below 256
    shard_writes.mark([small])
    assert _write(x, tmp_path / "a", small).tobytes() == np.asarray(x).tobytes()
    assert small.asked == [192, 192, 128]


class SeesArray(Recording):
    """Notes, at each reservation, whether the array's metadata (``zarr.json``) exists yet."""

    def __init__(self, path: Path, max_bytes: int = 1 << 40):
        super().__init__(max_bytes)
        self.path, self.existed = path, []

    async def wait_for_bytes(self, requested_bytes: int) -> None:
        self.existed.append((self.path / "zarr.json").exists())
        await super().wait_for_bytes(requested_bytes)


def test_an_array_is_created_once_its_first_bytes_are_admitted(tmp_path: Path) -> None:
    """A paced save's per-array set-up (TensorStore's opens, the metadata write) waits for the array's window
    with its writes, instead of all of it falling in the first train step beside the save."""
    x = arrays()[0]
    limiter = SeesArray(tmp_path / "a", max_bytes=x.nbytes // 2)
    shard_writes.mark([limiter])
    assert _write(x, tmp_path / "a", limiter).tobytes() == np.asarray(x).tobytes()
    assert limiter.existed == [False, True, True]  # three groups; opened once, after the first was admitted


def test_an_array_with_no_shard_to_write_here_is_still_created(tmp_path: Path) -> None:
    x = arrays()[0]
    none_here = dataclasses.replace(d2h.transfer([x], 0)[0], replica_slices=[])
    spec = _spec(x, tmp_path / "a", none_here.local_shape)
    asyncio.run(shard_writes.write_at_once(none_here, spec, context=None, primary_host=None, transaction=None,
                                           byte_limiter=Recording()))
    assert _opened(spec).shape == x.shape


def test_the_creating_process_opens_each_array_once_the_others_assume_its_metadata(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = arrays()[0]
    rslices = d2h.transfer([x], 0)[0]
    opens: list[dict[str, Any]] = []
    real_open = ts.open
    monkeypatch.setattr(ts, "open", lambda spec, **kw: opens.append(kw) or real_open(spec, **kw))
    specs = {where: _spec(x, tmp_path / where, rslices.local_shape) for where in ("primary", "other")}
    for primary_host, where in ((0, "primary"), (1, "other")):  # this test runs as process 0
        asyncio.run(shard_writes.write_at_once(rslices, specs[where], context=None, primary_host=primary_host,
                                               transaction=None, byte_limiter=Recording()))
    assert [(kw.get("create", False), kw.get("assume_metadata", False)) for kw in opens] == [(True, False),
                                                                                            (False, True)]
    monkeypatch.undo()
    assert _opened(specs["primary"]).read().result().tobytes() == np.asarray(x).tobytes()
    assert not (tmp_path / "other" / "zarr.json").exists()  # the primary host's to write, not this one's


def test_a_jaxckpt_save_reserves_each_arrays_bytes_once_and_reads_back_bit_for_bit(tmp_path: Path) -> None:
    """Through make_manager, with the limiter a paced save hands Orbax (jaxckpt.pacing)."""
    tree = named_arrays()
    limiter = Recording()
    with pacing.pacing(limiter):  # type: ignore[arg-type]  # any ByteLimiter serves as the pace
        _save(make_manager(tmp_path / "ck"), tree)
    local_bytes = sorted(d2h.LeanArrayHandler()._local_bytes(x) for x in tree.values())
    assert sorted(limiter.asked) == local_bytes
    assert_same_arrays(orbax_read(tmp_path / "ck" / "1" / "state", tree), tree, "orbax")


def test_wait_all_returns_once_every_write_is_done_and_raises_the_first_error() -> None:
    first, first_done = ts.Promise.new()
    second, second_done = ts.Promise.new()
    threading.Timer(0.2, lambda: (first.set_result(None), second.set_result(None))).start()
    shard_writes.wait_all([first_done, second_done])
    assert first_done.done() and second_done.done()
    failing, failed = ts.Promise.new()
    failing.set_exception(OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        shard_writes.wait_all([first_done, failed])


def test_stock_orbax_in_the_same_process_keeps_its_coroutine_per_shard(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[Any] = []
    at_once = shard_writes.write_at_once
    monkeypatch.setattr(shard_writes, "write_at_once", lambda *a, **k: called.append(a) or at_once(*a, **k))
    tree = named_arrays()
    _save(ocp.CheckpointManager(tmp_path / "stock"), tree)
    assert called == []
    _save(make_manager(tmp_path / "ours"), tree)
    assert len(called) == len(tree)
    assert_same_arrays(orbax_read(tmp_path / "stock" / "1" / "state", tree), tree, "stock")


def test_another_orbax_keeps_its_own_shard_writes(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def async_serialize_from_host(rslices: Any, tensorstore_spec: Any, *, context: Any = None) -> None:
        return None

    assert_install_keeps(shard_writes, orbax_ser, "async_serialize_from_host", async_serialize_from_host,
                         monkeypatch, caplog, "async_serialize_from_host", "Orbax's own coroutine")
