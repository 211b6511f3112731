"""The device-to-host step of a save, without Orbax's per-shard Python.

Before a save returns, Orbax hands every shard this process writes to the host
(``replica_slices.transfer_arrays_to_host``). It builds a ``ReplicaSlice`` per shard, copies it with
``dataclasses.replace``, probes each device's memories for pinned host memory and starts one copy per
shard. On 8 fake devices a 1 GB state is 1,423 shards, and that bookkeeping was most of the 0.15-0.18 s
the save blocked training (benchmarks/README.md, §1b).

:class:`LeanArrayHandler` is Orbax's ``ArrayHandler``; while it serializes, :func:`transfer` builds the
same ``ReplicaSlices`` with one batched copy: ``jax.copy_to_host_async``, or one ``jax.device_put`` into
pinned host memory where Orbax asks for that (its default on GPUs). That covers only what jaxckpt
configures: each shard written whole by one replica, no replica-parallel slicing. Everything else,
every other handler (stock Orbax in the same process) and any Orbax whose function does not have the
signature this was written against use Orbax's own function. Orbax then writes the
same shards to the same places: tests/test_d2h.py checks the slices against Orbax's own, and reads a
save back with plain Orbax, bit for bit.

A :class:`Snapshot` takes those host copies before Orbax's save call begins, so that the call can run on
a thread while training goes on (``jaxckpt.checkpoint.SaveStart``): :func:`transfer` then hands Orbax the
snapshot's copies of those same array objects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding
from orbax.checkpoint._src.serialization import replica_slices as rs

from jaxckpt import orbax_patch, pacing, shard_writes, sharding_file, substores

# Orbax's transfer_arrays_to_host parameters (orbax-checkpoint 0.12); anything else keeps Orbax's function.
EXPECTED_PARAMS = ("arrays", "replica_id", "use_replica_parallel", "min_slice_bytes_for_replica_parallel",
                   "max_replicas_for_replica_parallel", "enable_pinned_host_transfer")
EXPECTED_FIELDS = {rs.ReplicaSlice: ("index", "unsliced_data", "slice_args"),
                   rs.ReplicaSlices: ("global_shape", "local_shape", "sharding", "dtype", "is_on_host",
                                      "replica_slices")}


# The replica whose shards jaxckpt's handler writes (Orbax's default); a Snapshot is taken for it.
REPLICA_ID = 0
Plan = tuple[tuple[int, ...], tuple[tuple[int, Any], ...]]
_PLANS: dict[tuple[Any, tuple[int, ...], int | None], Plan] = {}
# id(array) -> (array, replica_id, its host copies), while a Snapshot of it is live.
_SNAPSHOTS: dict[int, tuple[jax.Array, int | None, rs.ReplicaSlices]] = {}


def pinned_by_default() -> bool:
    """Orbax's own default for a save's host copies: into pinned host memory on GPUs."""
    return jax.default_backend() == "gpu"


def _plan(arr: jax.Array, replica_id: int | None) -> Plan:
    """(shard shape, (position, index) of each addressable shard that ``replica_id`` writes).

    It depends only on the sharding and shape (jax orders an array's buffers by its sharding), so it is
    worked out once per sharding from ``addressable_shards``, whose Shard objects cost ~10 us apiece.
    """
    key = (arr.sharding, arr.shape, replica_id)
    plan = _PLANS.get(key)
    if plan is None:
        shards = arr.addressable_shards
        rid = shards[0].replica_id if replica_id is None else replica_id
        plan = (shards[0].data.shape, tuple((i, s.index) for i, s in enumerate(shards) if s.replica_id == rid))
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def transfer(arrays: Sequence[jax.Array], replica_id: int | None,
             pinned: bool = False) -> list[rs.ReplicaSlices]:
    """What Orbax's ``transfer_arrays_to_host`` returns without replica-parallel slicing: per array, the
    shards of one replica (``replica_id``, or the first shard's), on the host, through pinned host memory
    if ``pinned``. Arrays of a live :class:`Snapshot` for the same replica get the host copies it took."""
    taken = [_SNAPSHOTS.get(id(arr)) for arr in arrays]
    taken = [t[2] if t is not None and t[0] is arr and t[1] == replica_id else None
             for arr, t in zip(arrays, taken, strict=True)]
    fresh = iter(_copy_to_host([arr for arr, t in zip(arrays, taken, strict=True) if t is None], replica_id,
                               pinned))
    return [t if t is not None else next(fresh) for t in taken]


def _start_copies(shards: list[jax.Array], pinned: bool) -> list[jax.Array]:
    """Start every shard's copy to the host at once: into pinned host memory if ``pinned`` and its device
    has some (as Orbax does), else ``copy_to_host_async``. ``np.asarray`` of the result waits for it."""
    to_pin = [pinned and any(m.kind == "pinned_host" for m in x.device.addressable_memories()) for x in shards]
    put = [x for x, p in zip(shards, to_pin, strict=True) if p]
    moved = iter(jax.device_put(put, [SingleDeviceSharding(x.device, memory_kind="pinned_host") for x in put]))
    jax.copy_to_host_async([x for x, p in zip(shards, to_pin, strict=True) if not p])
    return [next(moved) if p else x for x, p in zip(shards, to_pin, strict=True)]


def _copy_to_host(arrays: Sequence[jax.Array], replica_id: int | None, pinned: bool) -> list[rs.ReplicaSlices]:
    """:func:`transfer` for arrays without a snapshot: all their shards' copies started in one batch."""
    if not arrays:
        return []
    plans = [_plan(arr, replica_id) for arr in arrays]
    picked = [[(index, arr.addressable_data(i)) for i, index in picks]
              for arr, (_, picks) in zip(arrays, plans, strict=True)]
    copies = iter(_start_copies([data for shards in picked for _, data in shards], pinned))
    out = []
    for arr, (local_shape, _), shards in zip(arrays, plans, picked, strict=True):
        slices = [rs.ReplicaSlice(index=index, unsliced_data=np.asarray(next(copies)), slice_args=None)
                  for index, _ in shards]
        out.append(rs.ReplicaSlices(global_shape=arr.shape, local_shape=local_shape, sharding=arr.sharding,
                                    dtype=arr.dtype, is_on_host=True, replica_slices=slices))
    return out


def snapshot_covers(tree: Any) -> bool:
    """Whether :class:`Snapshot` takes everything a save of ``tree`` reads from memory: every leaf a
    ``jax.Array`` (no numpy or Python values, which the caller could change) and none a typed PRNG key
    (Orbax saves its ``key_data``, a new array)."""
    leaves = jax.tree.leaves(tree)
    return all(isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
               for x in leaves)


class Snapshot:
    """Host copies of every array in ``tree``, taken now; a lean save of those same array objects (same
    replica) writes these copies instead of reading the devices again, so the arrays may be donated or
    deleted once this returns. Orbax then needs only their shape, dtype and sharding."""

    def __init__(self, tree: Any, replica_id: int | None = REPLICA_ID, pinned: bool | None = None):
        """``pinned``: copy through pinned host memory (default: :func:`pinned_by_default`)."""
        arrays = jax.tree.leaves(tree)
        self._ids = [id(arr) for arr in arrays]
        pinned = pinned_by_default() if pinned is None else pinned
        for arr, slices in zip(arrays, _copy_to_host(arrays, replica_id, pinned), strict=True):
            _SNAPSHOTS[id(arr)] = (arr, replica_id, slices)

    def release(self) -> None:
        """Drop the copies (the save has handed them to Orbax, or failed)."""
        for i in self._ids:
            _SNAPSHOTS.pop(i, None)
        self._ids = []


def _dispatching(orbax_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Orbax's function, except inside a :class:`LeanArrayHandler` save of the case :func:`transfer` covers."""

    @functools.wraps(orbax_fn)
    def transfer_arrays_to_host(arrays: Sequence[jax.Array], replica_id: int | None, use_replica_parallel: bool,
                                min_slice_bytes_for_replica_parallel: int | None = None,
                                max_replicas_for_replica_parallel: int | None = None, *,
                                enable_pinned_host_transfer: bool = False) -> Sequence[rs.ReplicaSlices]:
        if orbax_patch.LEAN_SAVE.get() and not use_replica_parallel:
            return transfer(arrays, replica_id, enable_pinned_host_transfer)
        return orbax_fn(arrays, replica_id, use_replica_parallel, min_slice_bytes_for_replica_parallel,
                        max_replicas_for_replica_parallel, enable_pinned_host_transfer=enable_pinned_host_transfer)

    return transfer_arrays_to_host


def compatible(fn: Callable[..., Any]) -> str | None:
    """None if ``fn`` and Orbax's slice classes are the ones :func:`transfer` stands in for, else why not."""
    why = orbax_patch.params_are(fn, EXPECTED_PARAMS)
    if why is not None:
        return why
    for cls, fields in EXPECTED_FIELDS.items():
        have = tuple(getattr(cls, "__dataclass_fields__", {}))
        if have != fields:
            return f"{cls.__name__} fields {have} are not {fields}"
    return None


@functools.cache
def install() -> bool:
    """Route Orbax's host transfer through :func:`_dispatching` once per process; False if this Orbax differs."""
    return orbax_patch.wrap_once(rs, "transfer_arrays_to_host", compatible, _dispatching,
                                 "saves use Orbax's own host transfer (slower with many shards)", __name__)


class LeanArrayHandler(ocp.type_handlers.ArrayHandler):
    """Orbax's ``ArrayHandler`` whose saves hand shards to the host with :func:`transfer` (see module doc),
    write each array's shards together (:mod:`jaxckpt.shard_writes`) and the sharding file in one write
    (:mod:`jaxckpt.sharding_file`)."""

    def __init__(self, *args: Any, store_bytes: int = substores.STORE_BYTES, **kwargs: Any):
        """``store_bytes``: what one OCDBT store of a save takes before the next begins (jaxckpt.substores)."""
        super().__init__(*args, **kwargs)
        install()
        self._writes_at_once = shard_writes.install()
        sharding_file.install()
        self._store_bytes = store_bytes if substores.install() else None

    def _local_bytes(self, arr: jax.Array) -> int:
        """Bytes of ``arr`` this process writes (the shards of the replica it writes)."""
        if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
            return 0  # a few bytes of key data
        shard_shape, picks = _plan(arr, self._replica_id)
        return len(picks) * int(np.prod(shard_shape)) * arr.dtype.itemsize

    async def serialize(self, values: Sequence[jax.Array], infos: Sequence[Any],
                        args: Sequence[Any] | None = None) -> Any:
        pacer = pacing.current()
        if pacer is not None:  # a save beside CPU training: Orbax asks the pacer before each array write
            infos = [info.replace(byte_limiter=pacer) for info in infos]
        if self._writes_at_once:  # each array's shard writes started together (jaxckpt.shard_writes)
            shard_writes.mark(info.byte_limiter for info in infos)
        if self._store_bytes and infos:  # a large save: several OCDBT stores (jaxckpt.substores)
            substores.plan(infos[0].parent_dir, [info.name for info in infos], [self._local_bytes(v) for v in values],
                           self._store_bytes)
        token = orbax_patch.LEAN_SAVE.set(True)
        try:
            return await super().serialize(values, infos, args)
        finally:
            orbax_patch.LEAN_SAVE.reset(token)
