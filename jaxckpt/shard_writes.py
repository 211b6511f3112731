"""The host-to-TensorStore step of a save, without a coroutine per shard.

For each array, Orbax's ``serialization.async_serialize_from_host`` wraps every shard's TensorStore write in
a coroutine of its own that reserves the shard's bytes from the save's byte limiter, writes, awaits and
releases; ``asyncio.gather`` then runs them all. On 8 fake devices a 4 GB state is ~9,600 shards, and that
machinery (with the garbage collections its objects set off) took 0.4-0.8 of a save's ~3.6 CPU-s on 2 cores
(benchmarks/README.md §1e, fourteenth session).

:func:`write_at_once` writes the same shards to the same TensorStore array: the array's bytes are reserved
from the same limiter once (in groups below its ``max_bytes``, if it has one), every shard's write is
started at once, and a worker thread waits for them. The array is opened (and created, with its metadata)
only once its first bytes are admitted: under a write pace (:mod:`jaxckpt.pacing`) that set-up then falls in
each array's window instead of all in the first train step beside the save (that step took 1.08-1.09x its
normal time on average with the small config's 172 arrays opened at once, 1.03-1.07x with the opens paced;
benchmarks/README.md §2, seventeenth session). Awaiting each TensorStore future in the event loop
instead has a TensorStore worker take the GIL to hand every finished write back (``call_soon_threadsafe``),
so the workers queued behind Python code; the thread blocks in ``result()`` without the GIL. Cyclic garbage
collection is paused while an array is written (:mod:`jaxckpt.gcpause`). Only saves of
:class:`jaxckpt.d2h.LeanArrayHandler` take this path: it marks the byte limiters of its saves
(:func:`mark`), and Orbax builds each array's write later, in its own background task, with that limiter.
Every other save (stock Orbax in the same process), and any Orbax whose function has another signature,
keeps Orbax's function.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import tensorstore as ts
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import limits
from orbax.checkpoint._src.serialization import serialization as orbax_ser

from jaxckpt import gcpause, orbax_patch

# Orbax's async_serialize_from_host parameters (orbax-checkpoint 0.12); anything else keeps Orbax's function.
EXPECTED_PARAMS = ("rslices_on_host", "tensorstore_spec", "context", "primary_host", "transaction", "byte_limiter")
# The byte limiters of LeanArrayHandler saves (Orbax makes one per save; the pacer of a paced save).
_LEAN_LIMITERS: weakref.WeakSet[limits.ByteLimiter] = weakref.WeakSet()


def mark(limiters: Iterable[limits.ByteLimiter | None]) -> None:
    """Array writes with one of ``limiters`` go through :func:`write_at_once`."""
    _LEAN_LIMITERS.update(x for x in limiters if x is not None)


def groups(nbytes: Sequence[int], max_bytes: int | None) -> Iterator[slice]:
    """Consecutive runs of ``nbytes`` each summing below ``max_bytes`` (an item as large stands alone, and
    the limiter then refuses it as it would have refused it alone); one run if ``max_bytes`` is None."""
    start, total = 0, 0
    for i, n in enumerate(nbytes):
        if max_bytes is not None and i > start and total + n >= max_bytes:
            yield slice(start, i)
            start, total = i, 0
        total += n
    if nbytes:
        yield slice(start, len(nbytes))


async def write_at_once(rslices_on_host: Any, tensorstore_spec: dict[str, Any], *, context: ts.Context | None,
                        primary_host: int | None, transaction: ts.Transaction | None,
                        byte_limiter: limits.ByteLimiter) -> None:
    """What Orbax's ``async_serialize_from_host`` writes, each group's shard writes started together."""
    if not rslices_on_host.is_on_host:
        raise ValueError("replica slices have not been transferred to the host")
    with gcpause.paused():
        spec = ts.Spec(tensorstore_spec)
        # each shard's index (jax's own slices: TensorStore takes them as they are) and host copy, without the
        # Fragment objects and stacking check of Orbax's to_fragments(): 1,423 shards 0.017 CPU-s -> 0.0004 s
        shards = [(s.index, s.data()) for s in rslices_on_host.replica_slices]
        if not shards:  # no shard of it to write here: the primary host still creates it
            await _open(spec, context, primary_host, transaction)
            return
        nbytes = [value.nbytes for _, value in shards]
        array = None
        for run in groups(nbytes, getattr(byte_limiter, "max_bytes", None)):
            async with limits.reserved_bytes(byte_limiter, sum(nbytes[run])):
                if array is None:  # opened once its first bytes are admitted: a paced save's set-up is paced too
                    array = await _open(spec, context, primary_host, transaction)
                writes = [array[index].write(value, can_reference_source_data_indefinitely=True)
                          for index, value in shards[run]]  # immutable host copies: TensorStore copies nothing
                await wait_for(writes)


async def _open(spec: ts.Spec, context: ts.Context | None, primary_host: int | None,
                transaction: ts.Transaction | None) -> ts.TensorStore:
    """The array to write, created by ``primary_host`` (every process if None) as Orbax does, which then
    writes through the handle the create returned; Orbax opens it a second time (226 arrays of a 1 GB state:
    0.11-0.13 s -> 0.06-0.09 s, benchmarks/README.md §1e). The other processes assume the metadata: no I/O."""
    if primary_host is None or multihost.process_index() == primary_host:
        return await ts.open(spec, create=True, open=True, context=context, transaction=transaction)
    return await ts.open(spec, open=True, assume_metadata=True, context=context, transaction=transaction)


async def wait_for(writes: Sequence[ts.Future]) -> None:
    """Until every one of ``writes`` is done, waited for on a worker thread (:func:`wait_all`)."""
    await asyncio.to_thread(wait_all, writes)


def wait_all(futures: Sequence[ts.Future]) -> None:
    """Block until every one of ``futures`` is done (GIL released while waiting); the first error raises."""
    for future in futures:
        future.result()


def _is_lean(byte_limiter: limits.ByteLimiter | None) -> bool:
    try:
        return byte_limiter in _LEAN_LIMITERS
    except TypeError:  # a limiter that cannot be weakly referenced was never marked
        return False


def _dispatching(orbax_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Orbax's function, except for writes with a byte limiter :func:`mark` recorded."""

    @functools.wraps(orbax_fn)
    def async_serialize_from_host(rslices_on_host: Any, tensorstore_spec: dict[str, Any], *,
                                  context: ts.Context | None = None, primary_host: int | None = 0,
                                  transaction: ts.Transaction | None = None,
                                  byte_limiter: limits.ByteLimiter | None = None) -> Any:
        kwargs = dict(context=context, primary_host=primary_host, transaction=transaction)
        if _is_lean(byte_limiter) and "metadata" in tensorstore_spec and "dtype" in tensorstore_spec:
            return write_at_once(rslices_on_host, tensorstore_spec, byte_limiter=byte_limiter, **kwargs)
        return orbax_fn(rslices_on_host, tensorstore_spec, byte_limiter=byte_limiter, **kwargs)

    return async_serialize_from_host


@functools.cache
def install() -> bool:
    """Route Orbax's shard writes through :func:`_dispatching` once per process; False if this Orbax differs."""
    return orbax_patch.wrap_once(orbax_ser, "async_serialize_from_host",
                                 lambda fn: orbax_patch.params_are(fn, EXPECTED_PARAMS), _dispatching,
                                 "saves write each shard through Orbax's own coroutine (slower with many shards)",
                                 __name__)
