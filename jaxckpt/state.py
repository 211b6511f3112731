"""The train state (params, optimizer state, step, RNG key), its shardings and abstract form.

The state is a plain dict pytree so checkpoint keys are names:
``{"params": {...}, "opt_state": ..., "step": int32[], "rng": uint32[2]}``.
It is created directly sharded with ``jax.jit(create, out_shardings=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxckpt.config import ModelConfig
from jaxckpt.mesh import replicated, sharding_for
from jaxckpt.model import Transformer

PyTree = Any


@dataclass(frozen=True)
class ModelDef:
    """What is needed to rebuild the NNX model from a params dict inside ``jit``."""

    cfg: ModelConfig
    graphdef: Any
    template: Any  # abstract nnx.State of the params (carries logical_axes metadata)

    @classmethod
    def build(cls, cfg: ModelConfig) -> ModelDef:
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        graphdef, template = nnx.split(abstract, nnx.Param)
        return cls(cfg, graphdef, template)

    def logical_axes(self) -> PyTree:
        """Params-shaped dict of logical axis tuples."""
        axes = jax.tree.map(
            lambda v: v.get_metadata().get("logical_axes"),
            self.template,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes

    def apply(self, params: PyTree, tokens_bt: jax.Array, key: jax.Array | None = None) -> jax.Array:
        state = jax.tree.map(lambda x: x, self.template, is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)(tokens_bt, key)


def init_params(cfg: ModelConfig, seed: int) -> PyTree:
    model = Transformer(cfg, nnx.Rngs(params=seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def params_on_one_device(cfg: ModelConfig) -> PyTree:
    """Abstract params (ShapeDtypeStructs) of ``cfg`` placed on the first local device: a restore target for
    tools that read a checkpoint's params outside training (``sample``, ``ckpt export``)."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                        jax.eval_shape(lambda: init_params(cfg, 0)))


def _create(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> PyTree:
    params = init_params(cfg, seed)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
    }


def state_shapes(mdef: ModelDef, tx: optax.GradientTransformation) -> PyTree:
    """ShapeDtypeStructs (no shardings) of every state leaf: one trace of the model's init."""
    return jax.eval_shape(lambda: _create(mdef.cfg, tx, 0))


def _traced(fn: Callable[[], Any]) -> Any:
    """``fn()`` run inside a trace, so that JAX ops in it are staged out instead of compiled and run.
    ``tree_map_params`` calls the optimizer's ``init``, whose ``jnp.zeros`` step count would otherwise
    compile a program on every start (0.03-0.13 s; a cache entry when the compilation cache is on)."""
    out: list[Any] = []
    jax.eval_shape(lambda: out.append(fn()))
    return out[0]


def state_shardings(mdef: ModelDef, tx: optax.GradientTransformation, mesh: Mesh,
                    shapes: PyTree | None = None) -> PyTree:
    """Shardings of every state leaf, derived from the params' logical axes (``shapes``: ``state_shapes``'
    result, if the caller has it: tracing the init again costs ~0.1 s for a small model)."""
    abstract = state_shapes(mdef, tx) if shapes is None else shapes
    logical = mdef.logical_axes()
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    param_sh = jax.tree.map(
        lambda ax, a: sharding_for(mesh, ax, a.shape), logical, abstract["params"], is_leaf=is_axes
    )
    opt_sh = _traced(lambda: optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract["opt_state"],
        param_sh,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    ))
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated(mesh), "rng": replicated(mesh)}


def abstract_state(mdef: ModelDef, tx: optax.GradientTransformation, mesh: Mesh,
                   shapes: PyTree | None = None, shardings: PyTree | None = None) -> PyTree:
    """ShapeDtypeStructs carrying the target shardings (restore targets); computes what is not given."""
    shapes = state_shapes(mdef, tx) if shapes is None else shapes
    shardings = state_shardings(mdef, tx, mesh, shapes) if shardings is None else shardings
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def create_state(mdef: ModelDef, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                 shardings: PyTree | None = None) -> PyTree:
    """A freshly initialised state, created sharded (never materialised on one device)."""
    shardings = state_shardings(mdef, tx, mesh) if shardings is None else shardings
    return jax.jit(lambda: _create(mdef.cfg, tx, seed), out_shardings=shardings)()
