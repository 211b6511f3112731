"""Sharding on 8 fake devices: params, Adam moments and batches carry the intended specs, and a
sharded train step computes the same numbers as the same step on one device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxckpt.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig
from jaxckpt.data import DataPipeline, prepare
from jaxckpt.mesh import LOGICAL_RULES, batch_sharding, logical_to_spec, make_mesh, sharding_for
from jaxckpt.optim import make_optimizer, make_schedule
from jaxckpt.state import ModelDef, abstract_state, create_state, state_shardings
from jaxckpt.step import jit_train_step

PyTree = Any
MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=16)

# What each param is declared with (model.py) and, through LOGICAL_RULES, where it must live.
EXPECTED_LOGICAL = {
    "embed": ("vocab", "embed"),
    "final_norm.scale": (None,),
    "attn.wq": ("embed", "heads", "head_dim"),
    "attn.wk": ("embed", "heads", "head_dim"),
    "attn.wv": ("embed", "heads", "head_dim"),
    "attn.wo": ("heads", "head_dim", "embed"),
    "attn_norm.scale": (None,),
    "mlp.w_gate": ("embed", "mlp"),
    "mlp.w_up": ("embed", "mlp"),
    "mlp.w_down": ("mlp", "embed"),
    "mlp_norm.scale": (None,),
}
EXPECTED_SPEC = {
    "embed": ("tensor", "fsdp"),
    "final_norm.scale": (None,),
    "attn.wq": ("fsdp", "tensor", None),
    "attn.wk": ("fsdp", "tensor", None),
    "attn.wv": ("fsdp", "tensor", None),
    "attn.wo": ("tensor", None, "fsdp"),
    "attn_norm.scale": (None,),
    "mlp.w_gate": ("fsdp", "tensor"),
    "mlp.w_up": ("fsdp", "tensor"),
    "mlp.w_down": ("tensor", "fsdp"),
    "mlp_norm.scale": (None,),
}


def leaf_name(path: tuple) -> str:
    """'blocks/0/attn/wq' -> 'attn.wq'; top-level names unchanged."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return ".".join(keys[2:] if keys[0] == "blocks" else keys)


def flat(tree: PyTree) -> dict[str, Any]:
    """Leaves keyed by their tree path string."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def norm_spec(spec: P, ndim: int) -> tuple:
    """A PartitionSpec as a tuple padded with None to ``ndim`` (P() == P(None) == P(None, None))."""
    t = tuple(spec)
    return t + (None,) * (ndim - len(t))


def adam_state(opt_state: PyTree) -> Any:
    """The ScaleByAdamState inside chain(clip, adamw)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(found) == 1, "expected exactly one Adam state in the optimizer"
    return found[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shard_data")
    raw = np.random.default_rng(7).integers(32, 127, size=8000).astype(np.uint8).tobytes()
    (root / "text.txt").write_bytes(raw)
    prepare([root / "text.txt"], root / "ds")
    return root / "ds"


@pytest.fixture(scope="module")
def mesh8() -> Mesh:
    assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices"
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def cfg(dataset: Path) -> Config:
    return Config(
        model=MODEL,
        # lr > 0 from step 0 so params really move; small because Adam's first update is
        # lr * g / (|g| + eps), which amplifies reduction-order noise for near-zero gradients.
        optim=OptimConfig(warmup_steps=0, lr=1e-4),
        data=DataConfig(path=str(dataset), batch_size=8),
    )


@dataclass
class Built:
    mdef: ModelDef
    tx: Any
    schedule: Any
    shardings: PyTree


def build(cfg: Config, mesh: Mesh) -> Built:
    mdef = ModelDef.build(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    return Built(mdef, tx, schedule, state_shardings(mdef, tx, mesh))


@pytest.fixture(scope="module")
def state8(cfg: Config, mesh8: Mesh) -> PyTree:
    """The state created sharded on the 8-device mesh (compiled once per module: it is slow on CPU)."""
    b = build(cfg, mesh8)
    return create_state(b.mdef, b.tx, mesh8, cfg.train.seed)


# -- rules -----------------------------------------------------------------------------------


def test_logical_rules_map_to_mesh_axes() -> None:
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
    assert logical_to_spec(None) == P()
    for name, axes in LOGICAL_RULES.items():
        names = axes if isinstance(axes, tuple) else (axes,)
        assert all(a in (None, "data", "fsdp", "tensor") for a in names), name
    with pytest.raises(KeyError, match="no rule in LOGICAL_RULES"):
        logical_to_spec(("embed", "experts"))


def test_sharding_for_drops_axes_that_do_not_divide(mesh8: Mesh) -> None:
    assert sharding_for(mesh8, ("embed", "heads", "head_dim"), (36, 3, 12)).spec == P("fsdp", None, None)
    assert sharding_for(mesh8, ("batch", "seq"), (6, 16)).spec == P(None, None)  # 6 % (2*2) != 0
    assert sharding_for(mesh8, ("batch", "seq"), (8, 16)).spec == P(("data", "fsdp"), None)


# -- state -----------------------------------------------------------------------------------


def test_params_and_adam_moments_carry_intended_specs(cfg: Config, mesh8: Mesh, state8: PyTree) -> None:
    b = build(cfg, mesh8)
    logical = {leaf_name(p): ax for p, ax in jax.tree_util.tree_flatten_with_path(
        b.mdef.logical_axes(), is_leaf=lambda x: isinstance(x, tuple))[0]}
    assert logical == EXPECTED_LOGICAL

    params = jax.tree_util.tree_flatten_with_path(state8["params"])[0]
    assert len(params) == 2 + MODEL.n_layers * 9  # embed, final norm; 9 per block
    adam = adam_state(state8["opt_state"])
    for tree_name, tree in (("params", state8["params"]), ("mu", adam.mu), ("nu", adam.nu)):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = leaf_name(path)
            assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh8, (tree_name, name)
            assert norm_spec(x.sharding.spec, x.ndim) == EXPECTED_SPEC[name], (tree_name, name, x.sharding.spec)
    # The shardings handed to jit (and used as restore targets) agree with what the arrays carry.
    want = flat(b.shardings)
    for key, x in flat(state8).items():
        assert x.sharding.is_equivalent_to(want[key], x.ndim), key
    # Non-param leaves are replicated scalars/keys.
    assert state8["step"].sharding.spec == P() and state8["rng"].sharding.spec == P()
    assert adam.count.sharding.spec == P()


def test_state_is_really_sharded(state8: PyTree) -> None:
    """Matrices are split into pieces (not 8 full replicas); norm scales are replicated."""
    w_gate = state8["params"]["blocks"][0]["mlp"]["w_gate"]
    assert len(w_gate.addressable_shards) == 8
    assert {s.data.shape for s in w_gate.addressable_shards} == {(16, 32)}  # (32/fsdp, 64/tensor)
    assert len({str(s.index) for s in w_gate.addressable_shards}) == 4  # 4 pieces, each on 2 data replicas
    embed = state8["params"]["embed"]
    assert {s.data.shape for s in embed.addressable_shards} == {(128, 16)}
    mu = adam_state(state8["opt_state"]).mu["blocks"][0]["attn"]["wo"]
    assert {s.data.shape for s in mu.addressable_shards} == {(1, 16, 16)}
    scale = state8["params"]["final_norm"]["scale"]
    assert {s.data.shape for s in scale.addressable_shards} == {(MODEL.d_model,)}
    n_elems = sum(x.size for x in jax.tree.leaves(state8["params"]))
    per_device = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(state8["params"]))
    assert per_device < n_elems / 3  # mostly split four ways


def test_abstract_state_targets_match_created_state(cfg: Config, mesh8: Mesh, state8: PyTree) -> None:
    b = build(cfg, mesh8)
    target = flat(abstract_state(b.mdef, b.tx, mesh8))
    state = flat(state8)
    assert target.keys() == state.keys()
    for key, x in state.items():
        t = target[key]
        assert (t.shape, t.dtype) == (x.shape, x.dtype), key
        assert t.sharding.is_equivalent_to(x.sharding, x.ndim), key


def test_state_shardings_run_nothing_on_the_devices(cfg: Config, mesh8: Mesh) -> None:
    """Working out the shardings (every start and restore does) only traces: optax's ``init`` inside it
    must not run its ``jnp.zeros`` step count as an eager op, which puts a value on a device (and compiles
    a program on every start)."""
    mdef, tx = ModelDef.build(cfg.model), make_optimizer(cfg.optim, cfg.train.steps)
    with jax.transfer_guard("disallow"):  # an eager op's constant is a host-to-device transfer
        shardings = state_shardings(mdef, tx, mesh8)
    assert jax.tree.leaves(shardings["opt_state"], is_leaf=lambda x: isinstance(x, NamedSharding))


def test_pipeline_batch_is_sharded_over_batch_axes(cfg: Config, mesh8: Mesh) -> None:
    p = DataPipeline(cfg.data, MODEL.seq_len, 256, mesh8)
    batch = p.to_global(next(p.train_iterator(0)))
    assert batch.shape == (8, MODEL.seq_len + 1)
    assert batch.sharding == batch_sharding(mesh8)
    assert batch.sharding.spec == P(("data", "fsdp"), None)
    # 4 distinct row blocks of 2, each on the 2 tensor-parallel devices of its (data, fsdp) cell.
    assert {s.data.shape for s in batch.addressable_shards} == {(2, MODEL.seq_len + 1)}
    assert len({str(s.index) for s in batch.addressable_shards}) == 4


# -- numerics --------------------------------------------------------------------------------


def run_steps(cfg: Config, mesh: Mesh, state: PyTree, n_steps: int) -> tuple[PyTree, list[dict[str, float]]]:
    """Take ``n_steps`` jitted train steps from ``state`` (donated) on ``mesh``; returns host state, metrics."""
    b = build(cfg, mesh)
    data = DataPipeline(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, mesh)
    step_fn = jit_train_step(b.mdef, b.tx, b.schedule, mesh, b.shardings)
    it = data.train_iterator(0)
    metrics = []
    for _ in range(n_steps):
        state, m = step_fn(state, data.to_global(next(it)))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    # Every output leaf keeps its declared sharding (nothing silently gathered by the step).
    want = flat(b.shardings)
    for key, x in flat(state).items():
        assert x.sharding.is_equivalent_to(want[key], x.ndim), key
    return jax.device_get(state), metrics


def test_sharded_steps_match_single_device(cfg: Config, mesh8: Mesh, state8: PyTree) -> None:
    """Two train steps on data=2 x fsdp=2 x tensor=2 give the single-device numbers."""
    mesh1 = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    b1 = build(cfg, mesh1)
    state1 = create_state(b1.mdef, b1.tx, mesh1, cfg.train.seed)
    init = jax.device_get(state1)
    # Same initialisation regardless of sharding (bitwise).
    init8 = flat(jax.device_get(state8))
    for key, x in flat(init).items():
        np.testing.assert_array_equal(init8[key], x, err_msg=key)
    assert all(x.sharding.mesh == mesh1 for x in jax.tree.leaves(state1))

    # A copy: the step donates its input and the module fixture must stay usable.
    start8 = jax.device_put(jax.device_get(state8), build(cfg, mesh8).shardings)
    after8, metrics8 = run_steps(cfg, mesh8, start8, 2)
    after1, metrics1 = run_steps(cfg, mesh1, state1, 2)

    for m8, m1 in zip(metrics8, metrics1, strict=True):
        for k in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    f8, f1, f0 = flat(after8), flat(after1), flat(init)
    assert f8.keys() == f1.keys()
    for key in f1:  # params, Adam mu/nu, counts, step, rng
        np.testing.assert_allclose(f8[key], f1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert int(after8["step"]) == int(after1["step"]) == 2
    # Not vacuous: params moved by about lr per step (Adam), far more than the tolerance,
    # and the two steps saw different batches.
    moved = max(float(np.max(np.abs(f1[k] - f0[k]))) for k in f1 if k.startswith("['params']"))
    assert moved > cfg.optim.lr
    assert metrics1[0]["loss"] != metrics1[1]["loss"]
