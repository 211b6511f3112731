"""The two layouts of the transformer blocks' params, and conversion between them (``model.scan_layers``).

Unrolled: ``params["blocks"] = {0: {"attn": {"wq": [d, n, h]}, ...}, 1: ...}``.
Stacked (scanned): ``params["blocks"] = {"attn": {"wq": [layers, d, n, h]}, ...}``, the layers axis replicated.
Converting is exact (stacking and slicing move bytes), so params trained in one layout load into the other,
and a whole train state (Adam's moments are params-shaped too) resumes in the other layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def is_stacked(params: PyTree) -> bool:
    """Whether ``params["blocks"]`` holds stacked layers (str keys) rather than one subtree per layer (0, 1, ...)."""
    return not any(isinstance(k, int) or str(k).isdigit() for k in params["blocks"])


def _in_order(blocks: dict) -> list[PyTree]:
    """Per-layer subtrees by layer number (keys may be ints or, as Orbax names them, strings: '10' after '9')."""
    return [blocks[k] for k in sorted(blocks, key=int)]


def _with_spec(sharding: jax.sharding.Sharding, ndim: int, edit: Any) -> jax.sharding.Sharding:
    """``sharding`` with its partition spec (padded to ``ndim``) edited; other shardings (one device) as is."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*edit(spec)))


def _layer_struct(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """One layer of a stacked leaf: the leading axis dropped, from its shape and its sharding."""
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_with_spec(x.sharding, x.ndim, lambda s: s[1:]))


def _stacked_struct(layers: list[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
    """The leaves of every layer as one, with a leading replicated layers axis."""
    x = layers[0]
    sharding = _with_spec(x.sharding, x.ndim, lambda s: (None, *s))
    return jax.ShapeDtypeStruct((len(layers), *x.shape), x.dtype, sharding=sharding)


def other_layout(abstract: PyTree) -> PyTree:
    """Abstract params (ShapeDtypeStructs with shardings) of the same model in the other block layout."""
    blocks = abstract["blocks"]
    if is_stacked(abstract):
        n_layers = jax.tree.leaves(blocks)[0].shape[0]
        converted = {i: jax.tree.map(_layer_struct, blocks) for i in range(n_layers)}
    else:
        converted = jax.tree.map(lambda *xs: _stacked_struct(list(xs)), *_in_order(blocks))
    return {**abstract, "blocks": converted}


def convert(params: PyTree, target: PyTree) -> PyTree:
    """``params`` in the layout of ``target`` (abstract, with shardings): stacked <-> unrolled, bit for bit."""
    if is_stacked(params) == is_stacked(target):
        return params
    shardings = jax.tree.map(lambda x: x.sharding, target["blocks"])
    if is_stacked(target):
        def move(blocks: PyTree) -> PyTree:
            return jax.tree.map(lambda *xs: jnp.stack(xs), *_in_order(blocks))
    else:
        def move(blocks: PyTree) -> PyTree:
            return {k: jax.tree.map(lambda x, i=int(k): x[i], blocks) for k in target["blocks"]}
    return {**params, "blocks": jax.jit(move, out_shardings=shardings)(params["blocks"])}


def _params_like(keys: set) -> Any:
    return lambda x: isinstance(x, dict) and "blocks" in x and set(x) == keys


def other_layout_state(abstract_state: PyTree) -> PyTree:
    """An abstract train state with every params-shaped subtree (params, Adam's mu and nu) in the other layout."""
    is_params = _params_like(set(abstract_state["params"]))
    return jax.tree.map(lambda x: other_layout(x) if is_params(x) else x, abstract_state, is_leaf=is_params)


def convert_state(state: PyTree, target: PyTree) -> PyTree:
    """``state`` with every params-shaped subtree in the layout (and shardings) of abstract ``target``."""
    is_params = _params_like(set(state["params"]))
    return jax.tree.map(lambda x, t: convert(x, t) if is_params(x) else x, state, target, is_leaf=is_params)
