"""jaxckpt.d2h: the lean device-to-host step of a save gives exactly what Orbax's own gives, and only
where jaxckpt's handler saves the case it covers (benchmarks/README.md, §1b)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.serialization import replica_slices as rs

from jaxckpt import d2h, orbax_patch
from jaxckpt.checkpoint import make_manager


def orbax_transfer() -> Any:
    """Orbax's own transfer_arrays_to_host, whether or not jaxckpt routed it through d2h."""
    fn = rs.transfer_arrays_to_host
    return getattr(fn, "jaxckpt_orbax", fn)


def arrays() -> list[jax.Array]:
    """Shardings a train state has on 8 devices: split, split on one axis of two, replicated, one device."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))

    def put(x: np.ndarray, spec: P) -> jax.Array:
        return jax.device_put(x, NamedSharding(mesh, spec))

    rng = np.random.default_rng(0)
    return [
        put(rng.standard_normal((8, 16), np.float32), P("a", "b")),
        put(rng.standard_normal((8, 16), np.float32), P("b", "a")),  # same shape, other boxes
        put(rng.standard_normal((6, 8), np.float32), P(None, "b")),  # each box held by 2 devices
        put(rng.integers(-9, 9, (4, 3), np.int32), P()),  # on all 8
        put(jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16), P("a", None)),
        put(np.float32(3.5), P()),
        jax.device_put(np.arange(5, dtype=np.int64), jax.devices()[3]),
    ]


def named_arrays() -> dict[str, jax.Array]:
    """:func:`arrays` as a tree to save, keyed x0, x1, ..."""
    return {f"x{i}": x for i, x in enumerate(arrays())}


def assert_same_slices(ours: list[Any], theirs: list[Any]) -> None:
    """Every field, index and byte of two transfers' ReplicaSlices agree."""
    for a, b in zip(ours, theirs, strict=True):
        assert (a.global_shape, a.local_shape, a.sharding, a.dtype, a.is_on_host) == \
               (b.global_shape, b.local_shape, b.sharding, b.dtype, b.is_on_host)
        assert [s.index for s in a.replica_slices] == [s.index for s in b.replica_slices]
        for s, t in zip(a.replica_slices, b.replica_slices, strict=True):
            assert isinstance(s.unsliced_data, np.ndarray) and s.slice_args is None
            assert s.unsliced_data.dtype == t.unsliced_data.dtype
            assert s.unsliced_data.tobytes() == t.unsliced_data.tobytes()


@pytest.mark.parametrize("pinned", [False, True], ids=["host", "pinned-host"])
@pytest.mark.parametrize("replica_id", [0, 1, None])
def test_transfer_gives_what_orbax_gives(replica_id: int | None, pinned: bool) -> None:
    """Also through pinned host memory, which Orbax uses by default on GPUs (the CPU backend has it too)."""
    xs = arrays()
    ours = d2h.transfer(xs, replica_id, pinned)
    assert len(ours) == len(xs)
    assert_same_slices(ours, orbax_transfer()(xs, replica_id, False, enable_pinned_host_transfer=pinned))
    assert sum(len(a.replica_slices) for a in ours) > len(xs)  # the test really covers several shards


def test_transfer_reuses_its_plan_for_new_arrays_of_the_same_shardings() -> None:
    """The second save's arrays are new objects with other bytes; the plan kept from the first still fits."""
    d2h.transfer(arrays(), 0)
    xs = [x * 2 for x in arrays()]
    assert_same_slices(d2h.transfer(xs, 0), orbax_transfer()(xs, 0, False))


def test_replica_one_writes_only_the_replicated_boxes_second_copies() -> None:
    """replica_id picks which copy of a replicated box is written; a split array has only replica 0."""
    split, split2, half, full, *_ = d2h.transfer(arrays(), 1)
    assert split.replica_slices == split2.replica_slices == []
    assert len(half.replica_slices) == 4 and len(full.replica_slices) == 1


def test_a_snapshot_stands_in_for_its_arrays_until_released() -> None:
    """Taken, then the arrays deleted (as a donating train step may): transfer of those same objects for the
    same replica gives the snapshot's copies, byte for byte what Orbax read before; other arrays, other
    replicas and a released snapshot go to the devices again."""
    xs = arrays()
    expected = orbax_transfer()(xs, 0, False)
    others = arrays()
    snap = d2h.Snapshot(xs, replica_id=0)
    assert all(d2h._SNAPSHOTS[id(x)][0] is x for x in xs)
    assert_same_slices(d2h.transfer(xs[:2], 1), orbax_transfer()(xs[:2], 1, False))  # another replica: fresh
    for x in xs:
        x.delete()
    mixed = d2h.transfer([xs[0], others[1], *xs[1:]], 0)  # a fresh array between snapshotted ones
    assert_same_slices([mixed[0], *mixed[2:]], expected)
    assert_same_slices([mixed[1]], orbax_transfer()(others[1:2], 0, False))
    snap.release()
    assert not any(id(x) in d2h._SNAPSHOTS for x in xs)
    with pytest.raises(RuntimeError, match="deleted"):
        d2h.transfer(xs[:1], 0)


def test_lean_only_inside_the_handler_and_only_for_the_case_it_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def lean(arrays: Any, replica_id: Any, pinned: bool) -> list:
        calls.append(f"lean pinned={pinned}")
        return []

    def orbax(*args: Any, **kwargs: Any) -> list:
        calls.append("orbax")
        return []

    monkeypatch.setattr(d2h, "transfer", lean)
    routed = d2h._dispatching(orbax)
    xs = arrays()[:1]
    routed(xs, 0, False)
    token = orbax_patch.LEAN_SAVE.set(True)
    try:
        routed(xs, 0, False)
        routed(xs, 0, True)  # replica-parallel slicing
        routed(xs, 0, False, enable_pinned_host_transfer=True)
    finally:
        orbax_patch.LEAN_SAVE.reset(token)
    assert calls == ["orbax", "lean pinned=False", "orbax", "lean pinned=True"]


def _save(manager: ocp.CheckpointManager, tree: dict[str, jax.Array]) -> None:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)), force=True)
    manager.wait_until_finished()
    manager.close()


def abstract_of(tree: dict[str, jax.Array]) -> dict[str, Any]:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def orbax_read(item: Path, tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The ``state`` item at ``item`` read by plain Orbax into ``tree``'s shapes, dtypes and shardings."""
    abstract = abstract_of(tree)
    restore = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    return ocp.PyTreeCheckpointer().restore(item, args=restore)


def assert_same_arrays(back: dict[str, jax.Array], tree: dict[str, jax.Array], what: str) -> None:
    """Every array of ``tree`` came back with its sharding and every byte."""
    for k, x in tree.items():
        assert back[k].sharding == x.sharding, (what, k)
        assert np.asarray(back[k]).tobytes() == np.asarray(x).tobytes(), (what, k)


def test_jaxckpt_saves_use_it_stock_orbax_does_not_and_both_read_back(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    xs = arrays()
    tree = {f"x{i}": x for i, x in enumerate(xs)}
    used: list[int] = []
    lean = d2h.transfer

    def counting(arrays: Any, replica_id: Any, pinned: bool) -> list:
        used.append(len(arrays))
        return lean(arrays, replica_id, pinned)

    monkeypatch.setattr(d2h, "transfer", counting)

    _save(make_manager(tmp_path / "ours"), tree)
    assert sum(used) == len(xs), "jaxckpt's handler did not hand the shards over through d2h.transfer"
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)}
    _save(ocp.CheckpointManager(tmp_path / "stock", item_handlers=handlers), tree)
    assert sum(used) == len(xs), "a stock Orbax handler went through d2h.transfer"

    for name in ("ours", "stock"):
        assert_same_arrays(orbax_read(tmp_path / name / "1" / "state", tree), tree, name)


def test_installed_over_this_orbax() -> None:
    """The Orbax this suite runs has the function d2h stands in for; a CI on a newer one says so here."""
    assert d2h.compatible(orbax_transfer()) is None
    assert d2h.install() and hasattr(rs.transfer_arrays_to_host, "jaxckpt_orbax")


def assert_install_keeps(module: Any, owner: Any, name: str, theirs: Callable[..., Any],
                         monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, *said: str) -> None:
    """With ``owner.name`` an Orbax function of another signature, ``module.install()`` declines, leaves that
    function in place and warns with every one of ``said``; afterwards it installs over this Orbax again."""
    monkeypatch.setattr(owner, name, theirs)
    module.install.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=module.__name__):
            assert module.install() is False
        assert getattr(owner, name) is theirs
        assert all(s in caplog.text for s in said), caplog.text
    finally:
        monkeypatch.undo()
        module.install.cache_clear()
    assert module.install()


def test_another_orbax_keeps_its_own_function(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def transfer_arrays_to_host(arrays: Any, replica_id: Any, *, new_option: bool = False) -> Any:
        return []

    assert_install_keeps(d2h, rs, "transfer_arrays_to_host", transfer_arrays_to_host, monkeypatch, caplog,
                         "new_option", "Orbax's own host transfer")
