"""jaxckpt.sharding_file: a jaxckpt save writes Orbax's ``_sharding`` file in one write, byte for byte the file
stock Orbax writes, and only jaxckpt's handler takes that path (benchmarks/README.md §2, twenty-fourth session)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.metadata import sharding as sharding_metadata
from orbax.checkpoint._src.serialization import jax_array_handlers as orbax_handlers
from test_d2h import _save, assert_install_keeps, assert_same_arrays, named_arrays, orbax_read

from jaxckpt import orbax_patch, sharding_file
from jaxckpt.checkpoint import make_manager


def orbax_fn() -> Any:
    fn = orbax_handlers._async_serialize_shardings
    return getattr(fn, "jaxckpt_orbax", fn)


def test_a_jaxckpt_save_writes_stock_orbax_s_sharding_file_in_one_write(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven arrays of six shardings (split on both mesh axes two ways, on one axis two ways, replicated for two
    of them, one device): the lean write ran for jaxckpt's save only, serialized each distinct sharding once,
    and both files are the same bytes, which plain Orbax reads back into every array."""
    tree = named_arrays()
    writes, described = [], []
    lean, describe = sharding_file.write, sharding_metadata.from_jax_sharding

    def counted_write(shardings: Any, infos: Any, *, primary_host: Any) -> Any:
        writes.append(len(infos))
        return lean(shardings, infos, primary_host=primary_host)

    def counted_describe(sharding: Any) -> Any:
        described.append(sharding)
        return describe(sharding)

    monkeypatch.setattr(sharding_file, "write", counted_write)
    monkeypatch.setattr(sharding_metadata, "from_jax_sharding", counted_describe)
    _save(make_manager(tmp_path / "ours"), tree)
    assert writes == [len(tree)]
    assert len(described) == len({x.sharding for x in tree.values()}) < len(tree)
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)}
    _save(ocp.CheckpointManager(tmp_path / "stock", item_handlers=handlers), tree)
    assert writes == [len(tree)], "a stock Orbax handler took the lean write"

    ours, stock = (tmp_path / name / "1" / "state" / "_sharding" for name in ("ours", "stock"))
    assert ours.read_bytes() == stock.read_bytes()
    assert len(json.loads(ours.read_bytes())) == len(tree)
    for name in ("ours", "stock"):
        assert_same_arrays(orbax_read(tmp_path / name / "1" / "state", tree), tree, name)


class Info:
    """The parts of Orbax's ParamInfo that the sharding file uses."""

    def __init__(self, name: str, parent_dir: Path | None):
        self.name, self.parent_dir, self.ts_context, self.awaited = name, parent_dir, None, False

    async def await_path_creation(self) -> None:
        self.awaited = True


def test_write_keeps_the_entries_already_in_the_file(tmp_path: Path) -> None:
    """A second call for the same directory adds its entries to the file instead of replacing it, and awaits
    every named array's directory; an array without a sharding gets no entry."""
    xs = list(named_arrays().values())
    first, second = [Info("a", tmp_path), Info("b", tmp_path)], [Info("c", tmp_path), Info("d", tmp_path)]
    asyncio.run(sharding_file.write([xs[0].sharding, xs[1].sharding], first, primary_host=0))
    asyncio.run(sharding_file.write([xs[3].sharding, None], second, primary_host=0))
    on_disk = json.loads((tmp_path / "_sharding").read_text())
    assert on_disk == sharding_file.entries([xs[0].sharding, xs[1].sharding, xs[3].sharding],
                                            [*first, second[0]])
    assert len(on_disk) == 3
    assert [i.awaited for i in first + second] == [True, True, True, False]


def test_only_lean_saves_of_one_directory_take_the_lean_write(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(sharding_file, "write", lambda s, i, *, primary_host: calls.append("lean"))
    routed = sharding_file._dispatching(lambda s, i, *, primary_host: calls.append("orbax"))
    one, two = [Info("a", Path("/x")), Info("b", Path("/x"))], [Info("a", Path("/x")), Info("b", Path("/y"))]
    routed([None, None], one, primary_host=0)  # outside a LeanArrayHandler save
    token = orbax_patch.LEAN_SAVE.set(True)
    try:
        routed([None, None], one, primary_host=0)
        routed([None, None], two, primary_host=0)  # arrays in two directories
        routed([None], [Info("a", None)], primary_host=0)  # no directory: Orbax's own error
    finally:
        orbax_patch.LEAN_SAVE.reset(token)
    assert calls == ["orbax", "lean", "orbax", "orbax"]


def test_installed_over_this_orbax() -> None:
    """The Orbax this suite runs has the function sharding_file stands in for; a CI on a newer one says so."""
    assert orbax_patch.params_are(orbax_fn(), sharding_file.EXPECTED_PARAMS) is None
    assert sharding_file.install() and hasattr(orbax_handlers._async_serialize_shardings, "jaxckpt_orbax")


def test_another_orbax_keeps_its_own_function(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    async def _async_serialize_shardings(shardings: Any, infos: Any, *, primary_host: Any, new: bool) -> None:
        return None

    assert_install_keeps(sharding_file, orbax_handlers, "_async_serialize_shardings", _async_serialize_shardings,
                         monkeypatch, caplog, "new", "one TensorStore open")
