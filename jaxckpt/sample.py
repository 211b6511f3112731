"""Text generation from a checkpoint: ``jaxckpt sample DIR --prompt "..."``."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxckpt.checkpoint import load_params, read_meta, resolve
from jaxckpt.config import Config
from jaxckpt.state import ModelDef, params_on_one_device
from jaxckpt.tokenizer import Tokenizer, load_tokenizer


def tokenizer_for(cfg: Config) -> Tokenizer:
    """The tokenizer the run's dataset was prepared with (byte-level for the default corpus)."""
    meta_path = Path(cfg.data.path) / "meta.json" if cfg.data.path else None
    if meta_path is not None and meta_path.is_file():
        import json

        return load_tokenizer(json.loads(meta_path.read_text())["tokenizer"])
    return load_tokenizer("bytes")


def load_model(spec: str) -> tuple[ModelDef, dict, Config, int]:
    """(model definition, params on one device, config, step) of checkpoint ``PATH[:STEP]``."""
    directory, step = resolve(spec)
    cfg = Config.from_dict(read_meta(directory, step)["config"])
    mdef = ModelDef.build(cfg.model)
    return mdef, load_params(f"{directory}:{step}", params_on_one_device(cfg.model)), cfg, step


def generate(mdef: ModelDef, params: dict, prompt_ids: np.ndarray, n_new: int, temperature: float,
             seed: int) -> np.ndarray:
    """Autoregressive sampling over a fixed window of ``seq_len`` tokens (no KV cache: small models)."""
    t = mdef.cfg.seq_len

    @jax.jit
    def next_token(window_t: jax.Array, length: jax.Array, key: jax.Array) -> jax.Array:
        logits_v = mdef.apply(params, window_t[None, :])[0, length - 1]
        if temperature <= 0:
            return jnp.argmax(logits_v)
        return jax.random.categorical(key, logits_v / temperature)

    ids = list(int(i) for i in prompt_ids) or [10]
    key = jax.random.key(seed)
    for i in range(n_new):
        ctx = ids[-t:]
        window = np.zeros((t,), np.int32)
        window[: len(ctx)] = ctx
        ids.append(int(next_token(jnp.asarray(window), len(ctx), jax.random.fold_in(key, i))))
    return np.asarray(ids[len(prompt_ids):], np.int32)


def sample(spec: str, prompt: str, n_new: int = 200, temperature: float = 0.8, seed: int = 0) -> str:
    mdef, params, cfg, _ = load_model(spec)
    tok = tokenizer_for(cfg)
    out = generate(mdef, params, tok.encode(prompt), n_new, temperature, seed)
    return prompt + tok.decode(out.tolist())
