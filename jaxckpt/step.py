"""Pure train and eval steps, jitted with explicit shardings and donation of the old state."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxckpt.mesh import batch_sharding, replicated
from jaxckpt.state import ModelDef

PyTree = Any


def loss_fn(mdef: ModelDef, params: PyTree, tokens_bt1: jax.Array, key: jax.Array | None) -> jax.Array:
    """Mean next-token cross-entropy over a batch of windows of length T+1."""
    logits_btv = mdef.apply(params, tokens_bt1[:, :-1], key)
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt1[:, 1:]).mean()


def train_step(
    mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule, state: PyTree, tokens_bt1: jax.Array
) -> tuple[PyTree, dict[str, jax.Array]]:
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    use_key = key if mdef.cfg.dropout > 0 else None
    loss, grads = jax.value_and_grad(lambda p: loss_fn(mdef, p, tokens_bt1, use_key))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
    return new_state, metrics


# What makes XLA:GPU steps bitwise reproducible (XLA's docs/determinism.md): deterministic kernels (no atomics
# in scatter-add, e.g. the embedding gradient) and no autotuning (which picks kernels by timing them, so two
# compiles of one step may pick differently: measured on an H200, benchmarks/README.md §6).
GPU_DETERMINISTIC = {"xla_gpu_deterministic_ops": True}
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# XLA:CPU hands each matmul to YNNPACK together with the elementwise work around it, instead of the matmul
# alone (XLA's default): the small config's step takes ~0.75x as long on 2 cores, same losses
# (benchmarks/README.md §4). The option is experimental in XLA, so it is set only where the installed XLA
# accepts it and XLA_FLAGS does not choose YNN fusions itself.
CPU_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def on_gpu(platform: str | None = None) -> bool:
    return (platform or jax.default_backend()) in GPU_PLATFORMS


@functools.cache
def cpu_options() -> dict[str, str]:
    """:data:`CPU_YNN_FUSIONS`, or nothing if XLA_FLAGS sets YNN fusions or this XLA refuses the option
    (tried once per process on a one-op program)."""
    if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return {}
    try:
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        jax.jit(lambda x: x + 1, compiler_options=CPU_YNN_FUSIONS).lower(scalar).compile()
    except Exception:  # noqa: BLE001 - an XLA without this option or value: its default fusions
        return {}
    return dict(CPU_YNN_FUSIONS)


def compiler_options(deterministic: bool, platform: str | None = None) -> dict[str, Any]:
    """XLA options for the train and eval steps on ``platform`` (default: JAX's default backend): on GPUs
    deterministic kernels if ``deterministic`` (CPUs and TPUs are deterministic anyway), on CPUs
    :func:`cpu_options`."""
    platform = platform or jax.default_backend()
    if on_gpu(platform):
        return dict(GPU_DETERMINISTIC) if deterministic else {}
    return dict(cpu_options()) if platform == "cpu" else {}


def jit_train_step(
    mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, shardings: PyTree,
    deterministic: bool = True,
) -> Callable[[PyTree, jax.Array], tuple[PyTree, dict[str, jax.Array]]]:
    """``(state, tokens) -> (state, metrics)``; the input state is donated. ``deterministic``: see
    ``TrainConfig.deterministic``."""
    return jax.jit(
        lambda s, b: train_step(mdef, tx, schedule, s, b),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(deterministic) or None,
    )


def jit_eval_step(mdef: ModelDef, mesh: Mesh, param_shardings: PyTree,
                  deterministic: bool = True) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``(params, tokens) -> loss`` without dropout; ``deterministic`` as for the train step, so a resumed
    run logs the same eval losses too."""
    return jax.jit(
        lambda p, b: loss_fn(mdef, p, b, None).astype(jnp.float32),
        in_shardings=(param_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
        compiler_options=compiler_options(deterministic) or None,
    )
