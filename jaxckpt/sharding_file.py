"""Orbax's ``_sharding`` file of a save in one write, not one TensorStore open per array.

Orbax's ``ArrayHandler`` records each array's sharding in its save's ``_sharding`` JSON file, under the array's
name in URL-safe base64. Its ``_async_serialize_shardings`` opens that file once per array through TensorStore's
JSON driver, at the array's JSON pointer, and writes every entry in one transaction. With the small config's 172
arrays that took ~0.1 s of Python under the GIL per save, on the thread Orbax starts with the save, so in the
first train step beside it (benchmarks/README.md §2, twenty-fourth session). :func:`write` serializes each
distinct sharding once, awaits the same directories, and writes all entries to the same file in one TensorStore
write, merged into any entries already there: the file is byte for byte Orbax's own (tests/test_sharding_file.py).
Only saves of :class:`jaxckpt.d2h.LeanArrayHandler` take this path, and only where all of a call's arrays share
one directory; an Orbax whose function has another signature keeps its own everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Callable, Sequence
from typing import Any

import tensorstore as ts
from orbax.checkpoint._src.metadata import sharding as sharding_metadata
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import jax_array_handlers as orbax_handlers
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from jaxckpt import orbax_patch

# Orbax's _async_serialize_shardings parameters (orbax-checkpoint 0.12); anything else keeps Orbax's function.
EXPECTED_PARAMS = ("shardings", "infos", "primary_host")
FILE = "_sharding"


def entries(shardings: Sequence[Any], infos: Sequence[Any]) -> dict[str, str]:
    """The file's entries for these arrays: each one's serialized sharding under its base64 name, as Orbax
    writes them (an array without a sharding, or with one Orbax cannot describe, has none)."""
    serialized: dict[Any, str | None] = {}
    out = {}
    for sharding, info in zip(shardings, infos, strict=True):
        if sharding is None:
            continue
        if sharding not in serialized:
            meta = sharding_metadata.from_jax_sharding(sharding)
            serialized[sharding] = None if meta is None else meta.to_serialized_string()
        if serialized[sharding] is not None:
            out[base64.urlsafe_b64encode(info.name.encode()).decode("utf-8")] = serialized[sharding]
    return out


async def write(shardings: Sequence[Any], infos: Sequence[Any], *, primary_host: int | None) -> None:
    """Orbax's ``_async_serialize_shardings`` for arrays that all live in ``infos[0].parent_dir``, in one write."""
    named = [info for sharding, info in zip(shardings, infos, strict=True) if sharding is not None]
    await asyncio.gather(*(info.await_path_creation() for info in named))
    table = entries(shardings, infos)
    if not table or not multihost.is_primary_host(primary_host):
        return
    kvstore = ts_utils.build_kvstore_tspec(named[0].parent_dir.as_posix(), name=FILE, use_ocdbt=False)
    store = await ts.open({"driver": "json", "kvstore": kvstore}, open=True, create=True,
                          context=named[0].ts_context)
    try:
        table = {**(await store.read()).item(), **table}
    except ValueError as e:  # the usual case: the save's first entries
        if "NOT_FOUND" not in str(e):
            raise
    await store.write(table)


def one_directory(infos: Sequence[Any]) -> bool:
    """Whether every array of ``infos`` has the same (known) directory, the case :func:`write` covers."""
    dirs = {info.parent_dir for info in infos}
    return len(dirs) == 1 and None not in dirs


def _dispatching(orbax_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Orbax's function, except inside a :class:`jaxckpt.d2h.LeanArrayHandler` save whose arrays share one
    directory."""

    @functools.wraps(orbax_fn)
    def _async_serialize_shardings(shardings: Sequence[Any], infos: Sequence[Any], *,
                                   primary_host: int | None) -> Any:
        if orbax_patch.LEAN_SAVE.get() and one_directory(infos):
            return write(shardings, infos, primary_host=primary_host)
        return orbax_fn(shardings, infos, primary_host=primary_host)

    return _async_serialize_shardings


@functools.cache
def install() -> bool:
    """Route Orbax's sharding-file writes through :func:`_dispatching` once per process; False if this Orbax
    differs."""
    return orbax_patch.wrap_once(orbax_handlers, "_async_serialize_shardings",
                                 lambda fn: orbax_patch.params_are(fn, EXPECTED_PARAMS), _dispatching,
                                 "saves write the sharding file through one TensorStore open per array", __name__)
