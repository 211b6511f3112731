"""``model.attention``: cuDNN's flash attention where the backend is a GPU, XLA's elsewhere."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxckpt.config import ConfigError, load_config
from jaxckpt.model import attention_kernel
from jaxckpt.resume import config_changes
from jaxckpt.state import ModelDef, init_params


@pytest.mark.parametrize(("attention", "backend", "kernel"), [
    ("cudnn", "gpu", "cudnn"), ("cudnn", "cuda", "cudnn"), ("cudnn", "cpu", "xla"), ("cudnn", "tpu", "xla"),
    ("xla", "gpu", "xla"), ("xla", "cpu", "xla"),
])
def test_cudnn_is_used_on_gpus_only(attention: str, backend: str, kernel: str) -> None:
    assert attention_kernel(attention, backend) == kernel


def logits(*overrides: str) -> np.ndarray:
    cfg = load_config(None, ["model.dtype=bfloat16", "model.n_layers=2", *overrides]).model
    mdef, params = ModelDef.build(cfg), init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.seq_len), 0, cfg.vocab_size)
    return np.asarray(jax.jit(mdef.apply)(params, tokens))


def test_a_cudnn_config_computes_xlas_bits_off_a_gpu() -> None:
    """A config trained on GPUs with cuDNN still runs here (tests, sampling): XLA's attention, the same bits."""
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(logits("model.attention=cudnn"), logits("model.attention=xla"))


def test_cudnn_needs_bfloat16() -> None:
    with pytest.raises(ConfigError, match="model.attention=cudnn needs model.dtype=bfloat16"):
        load_config(None, ["model.attention=cudnn", "model.dtype=float32"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash", "model.dtype=bfloat16"])


def test_switching_the_kernel_is_a_safe_change_on_resume() -> None:
    """The state is the same whichever kernel computes the step, so resuming with another one is allowed."""
    saved = load_config(None, ["model.dtype=bfloat16"]).to_dict()
    assert config_changes(saved, load_config(None, ["model.dtype=bfloat16", "model.attention=cudnn"])) == (
        ["model.attention: 'xla' -> 'cudnn'"], [])
