"""A large save's arrays spread over several OCDBT stores, so that their commits overlap.

Orbax writes each process's arrays into one OCDBT store of the item (``ocdbt.process_<i>``). At finalize
it merges every ``ocdbt.process_*`` store into the item's root manifest, which is what every reader opens.
One store commits one batch of writes at a time: data files, then its B-tree and manifest, then the next
batch. At 4 GB the disk idles in the gaps between those commits (benchmarks/README.md §1e, thirteenth
session). Several stores commit independently.

:func:`assign` spreads one save's arrays over ``stores_for(bytes)`` stores, largest first into the
emptiest. Store 0 is Orbax's own ``ocdbt.process_<i>``; store k > 0 is ``ocdbt.process_<i>s<k>``, a name
Orbax's merge and its process-id pattern accept. A save of up to ``store_bytes`` per process
(``checkpoint.ocdbt_store_mb``, 1 GiB by default) keeps one store, as before: at 1 GB, splitting measured no
faster. The result is the same plain Orbax checkpoint: tests/test_substores.py reads one back with
plain Orbax and with ``jaxckpt.fastread``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from jaxckpt import orbax_patch

STORE_BYTES = 1 << 30  # default bytes per store (checkpoint.ocdbt_store_mb); a 1 GB save keeps one store
MAX_STORES = 8
# (item directory, array name) -> store index, for the saves in flight; Orbax builds each array's write
# spec later, in its background task, from the same ParamInfo (name, parent_dir).
_ASSIGNED: dict[str, dict[str, int]] = {}
_KEEP_SAVES = 8
EXPECTED_KEYWORDS = ("info", "process_index")


def stores_for(nbytes: int, store_bytes: int) -> int:
    """How many OCDBT stores a process writing ``nbytes`` uses, ``store_bytes`` each."""
    return max(1, min(MAX_STORES, math.ceil(nbytes / store_bytes)))


def assign(names: Sequence[str], nbytes: Sequence[int], store_bytes: int) -> dict[str, int]:
    """Store index per array name: largest array first, each into the store with the fewest bytes so far."""
    stores = [0] * stores_for(sum(nbytes), store_bytes)
    out = {}
    for name, size in sorted(zip(names, nbytes, strict=True), key=lambda x: -x[1]):
        k = stores.index(min(stores))
        out[name] = k
        stores[k] += size
    return out


def plan(parent_dir: Any, names: Sequence[str], nbytes: Sequence[int], store_bytes: int) -> None:
    """Record where the arrays of the save into ``parent_dir`` go (nothing to record for one store)."""
    stores = assign(names, nbytes, store_bytes)
    _ASSIGNED.pop(str(parent_dir), None)  # an earlier attempt at the same directory
    if max(stores.values(), default=0) == 0:
        return
    if len(_ASSIGNED) >= _KEEP_SAVES:
        _ASSIGNED.pop(next(iter(_ASSIGNED)))
    _ASSIGNED[str(parent_dir)] = stores


def process_id(process_index: int | str | None, store: int) -> int | str | None:
    """The OCDBT process id Orbax names the store's directory after (``ocdbt.process_<id>``)."""
    if process_index is None or store == 0:
        return process_index
    return f"{process_index}s{store}"


def _spreading(orbax_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Orbax's ``build_array_write_spec``, with the process id of the store :func:`plan` chose."""

    @functools.wraps(orbax_fn)
    def build_array_write_spec(info: Any, *args: Any, process_index: int | str | None = None,
                               **kwargs: Any) -> Any:
        store = _ASSIGNED.get(str(info.parent_dir), {}).get(info.name, 0)
        return orbax_fn(info, *args, process_index=process_id(process_index, store), **kwargs)

    return build_array_write_spec


@functools.cache
def install() -> bool:
    """Route Orbax's write specs through :func:`_spreading` once per process; False if this Orbax differs
    (then every save keeps one store)."""
    return orbax_patch.wrap_once(ts_utils, "build_array_write_spec", _lacks_keywords, _spreading,
                                 "large saves use one OCDBT store", __name__)


def _lacks_keywords(fn: Callable[..., Any]) -> str | None:
    params = tuple(inspect.signature(fn).parameters)
    missing = [k for k in EXPECTED_KEYWORDS if k not in params]
    return f"build_array_write_spec{params} lacks {tuple(missing)}" if missing else None
