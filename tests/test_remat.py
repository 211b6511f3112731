"""``model.remat``: the same loss and gradients for less activation memory."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxckpt.config import ConfigError, load_config
from jaxckpt.state import ModelDef, init_params
from jaxckpt.step import loss_fn


def grad_step(remat: str, dtype: str):
    """(loss and grads, XLA's planned temporary bytes) of one dropout-on training loss on one device."""
    cfg = load_config(None, [f"model.remat={remat}", f"model.dtype={dtype}", "model.n_layers=3",
                             "model.dropout=0.1"]).model
    mdef, params = ModelDef.build(cfg), init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    loss_and_grads = jax.value_and_grad(lambda p: loss_fn(mdef, p, tokens, jax.random.key(3)))
    compiled = jax.jit(loss_and_grads).lower(params).compile()
    return jax.tree.leaves(compiled(params)), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remat_keeps_the_math_and_saves_memory(dtype: str) -> None:
    (ref, temp_none), (block, temp_block), (dots, temp_dots) = (grad_step(m, dtype) for m in ("none", "block", "dots"))
    tol = 1e-6 if dtype == "float32" else 2e-2
    for leaves in (block, dots):
        for a, b in zip(ref, leaves, strict=True):
            np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol, atol=tol)
    assert temp_block < temp_dots < temp_none, (temp_block, temp_dots, temp_none)
    assert temp_block < 0.6 * temp_none


def test_unknown_remat_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.remat"):
        load_config(None, ["model.remat=all"])
