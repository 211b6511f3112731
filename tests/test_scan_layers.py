"""``model.scan_layers``: the same model as one ``lax.scan`` over stacked blocks, whose program does not grow
with depth, sharded like the unrolled blocks with a replicated leading "layers" axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxckpt.config import MeshConfig, ModelConfig, load_config
from jaxckpt.mesh import make_mesh
from jaxckpt.optim import make_optimizer
from jaxckpt.state import ModelDef, init_params, state_shardings
from jaxckpt.step import loss_fn

LAYERS = 3


def model_cfg(*extra: str) -> ModelConfig:
    return load_config(None, [f"model.n_layers={LAYERS}", "model.dropout=0.1", *extra]).model


def stack_blocks(params: dict) -> dict:
    """Unrolled params (``blocks.0``, ``blocks.1``, ...) in the scanned layout (one leading layers axis)."""
    blocks = [params["blocks"][i] for i in range(len(params["blocks"]))]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def loss_and_grads(cfg: ModelConfig, params: dict) -> tuple[jax.Array, dict]:
    tokens = jax.random.randint(jax.random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    mdef = ModelDef.build(cfg)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(mdef, p, tokens, jax.random.key(3))))(params)


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scanned_blocks_compute_what_unrolled_blocks_do(remat: str) -> None:
    """Same params (stacked), same dropout keys per layer: the same loss and gradients up to float rounding."""
    unrolled = model_cfg(f"model.remat={remat}")
    scanned = model_cfg(f"model.remat={remat}", "model.scan_layers=true")
    params = init_params(unrolled, 0)
    loss_u, grads_u = loss_and_grads(unrolled, params)
    loss_s, grads_s = loss_and_grads(scanned, stack_blocks(params))
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    want = stack_blocks(grads_u)
    assert jax.tree.structure(grads_s) == jax.tree.structure(want)
    for g_s, g_u in zip(jax.tree.leaves(grads_s), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g_s, g_u, rtol=1e-5, atol=1e-7)


def test_scanned_init_stacks_layers_with_their_own_values() -> None:
    """One leading axis of n_layers; each layer drew its own random weights (not one copy broadcast)."""
    params = init_params(model_cfg("model.scan_layers=true"), 0)
    wq = params["blocks"]["attn"]["wq"]
    assert wq.shape[0] == LAYERS and params["embed"].ndim == 2
    assert len({np.asarray(wq[i]).tobytes() for i in range(LAYERS)}) == LAYERS


def count_dots(n_layers: int, scan: bool) -> int:
    """dot_general ops in the lowered (uncompiled) gradient program of an ``n_layers`` model."""
    cfg = load_config(None, [f"model.n_layers={n_layers}", f"model.scan_layers={scan}"]).model
    mdef, params = ModelDef.build(cfg), jax.eval_shape(lambda: init_params(cfg, 0))
    tokens = jax.ShapeDtypeStruct((2, cfg.seq_len + 1), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, t: loss_fn(mdef, p, t, None)))
    return grad.lower(params, tokens).as_text().count("dot_general")


def test_scanned_program_does_not_grow_with_depth() -> None:
    """What makes compile time flat in depth: the scanned program holds one block, the unrolled one n."""
    assert count_dots(2, scan=True) == count_dots(6, scan=True)
    assert count_dots(6, scan=False) > 2 * count_dots(2, scan=False)


def test_stacked_params_shard_like_unrolled_ones_with_layers_replicated() -> None:
    assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices"
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tx = make_optimizer(load_config(None, []).optim, 10)
    sh_s = state_shardings(ModelDef.build(model_cfg("model.scan_layers=true")), tx, mesh)["params"]
    sh_u = state_shardings(ModelDef.build(model_cfg()), tx, mesh)["params"]
    assert sh_s["blocks"]["attn"]["wq"].spec == P(None, "fsdp", "tensor", None)
    for path, s in jax.tree_util.tree_flatten_with_path(sh_s["blocks"])[0]:
        per_layer = sh_u["blocks"][0]
        for key in path:
            per_layer = per_layer[key.key]
        assert s.spec == P(None, *per_layer.spec), jax.tree_util.keystr(path)
    assert sh_s["embed"].spec == sh_u["embed"].spec


def test_train_state_converts_between_layouts_bit_for_bit() -> None:
    """Params and Adam's moments restacked and split back: every array equal, shardings as the model wants."""
    from jaxckpt.layout import convert_state, other_layout_state
    from jaxckpt.state import abstract_state, create_state

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tx = make_optimizer(load_config(None, []).optim, 10)
    unrolled, scanned = ModelDef.build(model_cfg()), ModelDef.build(model_cfg("model.scan_layers=true"))
    state = create_state(unrolled, tx, mesh, 0)
    state = {**state, "opt_state": jax.tree.map(lambda x: x + 1 if x.ndim else x, state["opt_state"])}  # mu != 0
    target_s, target_u = abstract_state(scanned, tx, mesh), abstract_state(unrolled, tx, mesh)
    assert jax.tree.structure(other_layout_state(target_u)) == jax.tree.structure(target_s)
    stacked = convert_state(state, target_s)
    for x, t in zip(jax.tree.leaves(stacked), jax.tree.leaves(target_s), strict=True):
        assert x.shape == t.shape and x.sharding.is_equivalent_to(t.sharding, x.ndim)
    mu_s, mu_u = stacked["opt_state"][1][0].mu, state["opt_state"][1][0].mu
    np.testing.assert_array_equal(mu_s["blocks"]["mlp"]["w_up"][2], mu_u["blocks"][2]["mlp"]["w_up"])
    back = convert_state(stacked, target_u)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_layers_keep_their_order_past_nine() -> None:
    """Unrolled keys may be strings (as Orbax names them): layer 10 goes after 9, not after 1."""
    from jaxckpt.layout import convert, other_layout

    one = jax.sharding.NamedSharding(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]), P())
    unrolled = {"blocks": {str(i): {"w": jnp.full((2,), i, jnp.float32)} for i in range(12)}}
    target_u = {"blocks": {str(i): {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one)} for i in range(12)}}
    target_s = other_layout(target_u)
    assert target_s["blocks"]["w"].shape == (12, 2)
    stacked = convert(unrolled, target_s)
    np.testing.assert_array_equal(stacked["blocks"]["w"][:, 0], np.arange(12))
    back = convert(stacked, target_u)
    assert all(float(back["blocks"][str(i)]["w"][0]) == i for i in range(12))
