"""jaxckpt.fastread: the state item read straight from Orbax's files must equal Orbax's own restore, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxckpt import fastread
from jaxckpt.checkpoint import OCDBT_TARGET_FILE_BYTES, Checkpointer, make_manager
from jaxckpt.config import CheckpointConfig

PyTree = Any


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def sample_state() -> PyTree:
    """Leaves of every kind the trainer saves: sharded 2-D, bf16, int scalars, uint32 rng, tiny inline arrays."""
    m = mesh((4, 2), ("fsdp", "tensor"))
    rng = np.random.default_rng(0)

    def put(x: np.ndarray, spec: P) -> jax.Array:
        return jax.device_put(x, NamedSharding(m, spec))

    return {
        "params": {
            "w": put(rng.normal(size=(64, 48)).astype(np.float32), P("fsdp", "tensor")),
            "emb": put(rng.normal(size=(96, 16)).astype(jnp.bfloat16), P("fsdp")),
            "norm": put(rng.normal(size=(16,)).astype(np.float32), P()),
        },
        "opt_state": [put(np.zeros((64, 48), np.float32), P("fsdp", "tensor")), put(np.int32(7), P())],
        "step": put(np.int32(123), P()),
        "rng": put(np.array([1, 2**32 - 1], np.uint32), P()),
    }


def save(directory: Path, state: PyTree, manager: ocp.CheckpointManager | None = None) -> Path:
    mgr = manager or make_manager(directory)
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
        state, ocdbt_target_data_file_size=OCDBT_TARGET_FILE_BYTES)), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return directory / "1" / "state"


def abstract(state: PyTree, shardings: PyTree | None = None) -> PyTree:
    shardings = shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def assert_bitwise(expected: PyTree, got: PyTree, target: PyTree) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for x, y, t in zip(jax.tree.leaves(expected), jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.sharding.is_equivalent_to(t.sharding, y.ndim)
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_same_shardings_bitwise(tmp_path: Path) -> None:
    state = sample_state()
    item = save(tmp_path, state)
    assert_bitwise(state, fastread.restore(item, abstract(state)), abstract(state))


@pytest.mark.parametrize("layout", ["transposed", "one-device", "replicated-on-3"])
def test_other_mesh_bitwise(tmp_path: Path, layout: str) -> None:
    """Restoring onto another mesh reads the overlapping parts of the saved chunks."""
    state = sample_state()
    item = save(tmp_path, state)
    if layout == "transposed":
        m = mesh((2, 4), ("a", "b"))
        shardings = jax.tree.map(lambda x: NamedSharding(m, P("b", "a") if x.ndim == 2 else P()), state)
    elif layout == "one-device":
        shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[5]), state)
    else:
        shardings = jax.tree.map(lambda x: NamedSharding(mesh((3,), ("r",)), P()), state)
    target = abstract(state, shardings)
    assert_bitwise(state, fastread.restore(item, target), target)


def test_compressed_checkpoint_is_unsupported(tmp_path: Path) -> None:
    """Stock Orbax settings (zstd) are valid but not this reader's layout: it says so rather than misreading."""
    state = sample_state()
    stock = ocp.CheckpointManager(tmp_path, item_handlers={"state": ocp.PyTreeCheckpointHandler(use_zarr3=True)})
    item = save(tmp_path, state, stock)
    with pytest.raises(fastread.Unsupported, match="codecs"):
        fastread.restore(item, abstract(state))


def test_wrong_target_shape_is_unsupported(tmp_path: Path) -> None:
    state = sample_state()
    item = save(tmp_path, state)
    target = abstract(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((64, 40), jnp.float32, sharding=target["params"]["w"].sharding)
    with pytest.raises(fastread.Unsupported, match="params.w"):
        fastread.restore(item, target)


@pytest.mark.parametrize("fast", [True, False])
def test_checkpointer_restore_then_donating_step(tmp_path: Path, fast: bool) -> None:
    """Both restore paths give the same bits, and a donating jitted step on them gives the same bits too
    (the fast path hands the CPU client aliased host buffers; donation must not corrupt anything)."""
    state = sample_state()
    item_dir = save(tmp_path / "checkpoints", state).parent.parent
    expected = jax.tree.map(lambda x: 2 * x + 1, state)
    with Checkpointer(item_dir, CheckpointConfig(fast_restore=fast)) as ckpt:
        restored = ckpt.restore(1, abstract(state), None)
    assert_bitwise(state, restored, abstract(state))
    step = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x + 1, s), donate_argnums=0)
    assert_bitwise(expected, step(restored), abstract(state))


def test_real_train_state_takes_the_fast_path(tmp_path: Path) -> None:
    """The trainer's own state tree (optax named tuples, rng, step) is in the layout the reader handles."""
    from jaxckpt.config import MeshConfig, ModelConfig, OptimConfig
    from jaxckpt.mesh import make_mesh
    from jaxckpt.optim import make_optimizer
    from jaxckpt.state import ModelDef, abstract_state, create_state

    mdef = ModelDef.build(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16))
    tx, m = make_optimizer(OptimConfig(), 10), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    state = create_state(mdef, tx, m, seed=3)
    item = save(tmp_path, state)
    target = abstract_state(mdef, tx, m)
    assert_bitwise(state, fastread.restore(item, target), target)


def test_arena_hands_out_aligned_disjoint_arrays() -> None:
    arena = fastread.Arena(64 + 16 * 2 * 8)
    a = arena.take((3,), np.dtype(np.float32))
    b = arena.take((16, 2), np.dtype(np.float64))
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
    assert b.ctypes.data >= a.ctypes.data + 64  # padded to the next 64 bytes, not overlapping
    with pytest.raises(ValueError, match="arena"):
        arena.take((1 << 20,), np.dtype(np.float32))  # 4 MiB: more than the 2 MiB alignment slack


def buffer_starts(tree: PyTree) -> list[int]:
    return [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) for s in x.addressable_shards]


def test_restored_shards_alias_one_host_allocation(tmp_path: Path) -> None:
    """Every shard's device buffer lies inside one allocation: the CPU client aliased the reader's buffers
    (no second copy), the reader made one allocation for them all, not one per box, and the devices that hold
    the same box (replicas) share its one buffer, as ``jax.device_put`` of a numpy array does."""
    state = sample_state()
    restored = fastread.restore(save(tmp_path, state), abstract(state))
    starts: dict[tuple[int, tuple[tuple[int, int], ...]], set[int]] = {}  # (leaf, box) -> buffer starts
    nbytes: dict[tuple[int, tuple[tuple[int, int], ...]], int] = {}
    for leaf, x in enumerate(jax.tree.leaves(restored)):
        for shard in x.addressable_shards:
            box = (leaf, tuple(s.indices(n)[:2] for s, n in zip(shard.index, x.shape, strict=True)))
            starts.setdefault(box, set()).add(shard.data.unsafe_buffer_pointer())
            nbytes[box] = shard.data.nbytes
    n_shards = sum(len(x.addressable_shards) for x in jax.tree.leaves(restored))
    assert len(starts) < n_shards  # the sample state has replicated boxes
    assert all(len(s) == 1 for s in starts.values())  # a box's replicas share one buffer
    first = {box: min(s) for box, s in starts.items()}
    assert len(set(first.values())) == len(first)  # and each box has a buffer of its own
    padded = sum(-(-n // 64) * 64 for n in nbytes.values())
    assert max(first[b] + nbytes[b] for b in first) - min(first.values()) <= padded


def test_a_donating_step_never_writes_into_the_restored_host_buffers(tmp_path: Path) -> None:
    """Replicas share a host buffer, which is only safe while XLA declines to donate buffers that alias host
    memory and writes a donating step's output elsewhere. The same step on device-made copies of the arrays
    does write in place (the check can fail); if a jax release starts doing that to host buffers, this fails."""
    state = sample_state()
    restored = fastread.restore(save(tmp_path, state), abstract(state))
    step = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x + 1, s), donate_argnums=0)
    copies = jax.tree.map(jnp.copy, restored)
    copied_starts = set(buffer_starts(copies))
    assert copied_starts & set(buffer_starts(step(copies)))  # device memory: written in place
    host_starts = set(buffer_starts(restored))
    out = step(restored)
    assert not host_starts & set(buffer_starts(out))
    assert_bitwise(jax.tree.map(lambda x: 2 * x + 1, state), out, abstract(state))


def test_runs_cover_every_job_once_in_disk_order() -> None:
    """The read is cut into runs (one thread-pool task each) that keep the on-disk order and cover every job:
    a run closes once it holds total / (4 * threads) bytes (at least 1 MiB, at most 32 MiB)."""
    outs = [np.empty(n << 20, np.uint8) for n in [3, 1, 5, 1, 1, 40, 2]]  # 53 MiB
    order = [6, 0, 5, 1, 3, 2, 4]  # MiB in this order: 2 3 40 | 1 1 5 | 1
    assert fastread._runs(order, outs, threads=2) == [[6, 0, 5], [1, 3, 2], [4]]  # runs close at >= 6.6 MiB
    assert fastread._runs(order, outs, threads=1) == [[6, 0, 5], [1, 3, 2, 4]]  # >= 13.25 MiB
    assert fastread._runs(order, outs, threads=64) == [[6], [0], [5], [1], [3], [2], [4]]  # the 1 MiB floor
    assert fastread._runs([], [], threads=2) == [[]]
