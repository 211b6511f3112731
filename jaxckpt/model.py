"""Decoder-only transformer in Flax NNX: RMSNorm, rotary positions, SwiGLU MLP, causal attention.

Every parameter carries ``logical_axes`` metadata; ``jaxckpt.mesh.LOGICAL_RULES`` maps those
names to mesh axes. Parameters are float32; activations use ``ModelConfig.dtype``.
With ``ModelConfig.scan_layers`` the blocks' params are stacked on a leading "layers" axis and the blocks
run as one ``lax.scan`` (params ``blocks.attn.wq`` of shape [layers, ...] instead of ``blocks.0.attn.wq``, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxckpt.config import ModelConfig


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], logical: tuple, std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=logical)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(None,))
        self.eps = eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x_btd.dtype)


def rotary(x_btnh: jax.Array, theta: float) -> jax.Array:
    """Apply rotary position embeddings over the sequence axis (positions 0..T-1)."""
    t, h = x_btnh.shape[1], x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    ang_tf = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    sin, cos = jnp.sin(ang_tf)[None, :, None, :], jnp.cos(ang_tf)[None, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def attention_kernel(attention: str, backend: str) -> str:
    """``jax.nn.dot_product_attention``'s implementation for ``ModelConfig.attention`` on ``backend``."""
    return "cudnn" if attention == "cudnn" and backend in ("gpu", "cuda") else "xla"


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n = cfg.d_model, cfg.n_heads
        h = d // n
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std)
        self.wk = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std)
        self.wv = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std)
        self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std)
        self.theta, self.dtype = cfg.rope_theta, jnp.dtype(cfg.dtype)
        self.implementation = attention_kernel(cfg.attention, jax.default_backend())

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        q_btnh = rotary(jnp.einsum("btd,dnh->btnh", x_btd, w(self.wq)), self.theta)
        k_btnh = rotary(jnp.einsum("btd,dnh->btnh", x_btd, w(self.wk)), self.theta)
        v_btnh = jnp.einsum("btd,dnh->btnh", x_btd, w(self.wv))
        o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, is_causal=True,
                                              implementation=self.implementation)
        return jnp.einsum("btnh,nhd->btd", o_btnh, w(self.wo))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), out_std)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btf = x_btd @ self.w_gate[...].astype(self.dtype)
        up_btf = x_btd @ self.w_up[...].astype(self.dtype)
        return (jax.nn.silu(gate_btf) * up_btf) @ self.w_down[...].astype(self.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg, rngs)
        self.rate = cfg.dropout

    def __call__(self, x_btd: jax.Array, key: jax.Array | None = None) -> jax.Array:
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x_btd = x_btd + dropout(self.attn(self.attn_norm(x_btd)), self.rate, k1)
        return x_btd + dropout(self.mlp(self.mlp_norm(x_btd)), self.rate, k2)


RunBlock = Callable[[Block, jax.Array, jax.Array | None], jax.Array]


def remat_block(mode: str) -> RunBlock:
    """``(block, x_btd, key) -> block(x_btd, key)``, rematerialised as ``ModelConfig.remat`` says."""
    call = lambda block, x_btd, key: block(x_btd, key)  # noqa: E731
    if mode == "none":
        return call
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if mode == "dots" else None
    return nnx.remat(call, policy=policy)


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """``cfg.n_layers`` blocks as one Block whose params have a leading "layers" axis (for ``scan_blocks``)."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return make(rngs)


def scan_blocks(run_block: RunBlock, stacked: Block, x_btd: jax.Array, keys_l: jax.Array | None) -> jax.Array:
    """Apply stacked blocks in order with one ``lax.scan``: the program holds one block, whatever the depth."""
    graphdef, state = nnx.split(stacked)

    def body(x_btd: jax.Array, layer: tuple[nnx.State, jax.Array | None]) -> tuple[jax.Array, None]:
        layer_state, key = layer
        return run_block(nnx.merge(graphdef, layer_state), x_btd, key), None

    return jax.lax.scan(body, x_btd, (state, keys_l))[0]


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.scan_layers:
            self.blocks = stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def __call__(self, tokens_bt: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Logits (float32) of shape [batch, seq, vocab]; ``key`` enables dropout (training)."""
        dtype = jnp.dtype(self.cfg.dtype)
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dtype)
        run_block = remat_block(self.cfg.remat)
        layer_key = lambda i: None if key is None else jax.random.fold_in(key, i)  # noqa: E731
        if self.cfg.scan_layers:
            keys_l = None if key is None else jax.vmap(layer_key)(jnp.arange(self.cfg.n_layers))
            x_btd = scan_blocks(run_block, self.blocks, x_btd, keys_l)
        else:
            for i, block in enumerate(self.blocks):
                x_btd = run_block(block, x_btd, layer_key(i))
        x_btd = self.final_norm(x_btd)
        if self.cfg.tie_embeddings:
            logits_btv = x_btd @ self.embed[...].astype(dtype).T
        else:
            logits_btv = x_btd @ self.unembed[...].astype(dtype)
        return logits_btv.astype(jnp.float32)


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
