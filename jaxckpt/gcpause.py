"""Cyclic garbage collection paused while parts of a save run, counted across threads.

A full collection holds the GIL for as long as it takes to walk every tracked object: 0.09-0.16 s in a
process holding a 4 GB state on 8 fake devices, where each save set one off in Orbax's background thread
while its shard writes were in flight (benchmarks/README.md §1e, fifteenth session). Python code could not
issue writes meanwhile, TensorStore's workers could not hand back finished ones, and a train step beside the
save could not be dispatched. Reference counting still frees everything that is not in a cycle; the
collector runs again once the last pause ends.

Pauses may overlap (the blocking part of a save on the train thread, the writes on Orbax's): collection
stays off until the last one ends, and comes back only if it was on when the first began. A paced save
(:mod:`jaxckpt.pacing`) writes over several train steps, so collection stays off that long (5-7 s for the
small config's 129 MB on 2 cores). A ``gc.disable()`` of your own made while a pause is in progress is undone
when the last pause ends, if collection was on when the first began.

Collections that do run while a save is in flight should be cheap too. The save allocates enough to set off a
full collection after its writes as well, in Orbax's metadata step on the durable path: 0.11-0.12 s there,
nearly all of it walking the ~220,000 objects the process held before the save began. :func:`freeze` at a
save's start exempts those (``gc.freeze``) until :func:`thaw` at its end, so that collection took 3-5 ms.
Reference counting still frees them meanwhile; cyclic garbage among them waits for the first full collection
after the thaw. Where the process has frozen objects itself since importing jaxckpt (``gc.freeze()`` before
forking, say), both do nothing. A thaw unfreezes the whole permanent generation (``gc.unfreeze``), including
what was there at import.

A process's start-up is paused too (:func:`begin_start_up` ... :func:`end_start_up`): ``jaxckpt train`` from
its first line, ``jaxckpt.trainer.train`` from its entry, until the first step has run. Importing jax, flax,
Orbax and Grain and building the run allocate ~300,000 objects that live as long as the process; collecting
as they grow walked them over and over: 0.3 s of a 4.4-4.8 s warm restart of the small config on 2 cores, and
as much of a cold one (benchmarks/README.md §3, twenty-third session), to find ~4,000 unreachable objects. At
the end they are frozen (:func:`freeze`) rather than walked, until the first save's thaw.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # pauses in progress
_resume = False  # whether collection was enabled when the first of them began
_frozen = False  # whether freeze() froze the objects that are in gc's permanent generation now
_start_up = False  # whether begin_start_up()'s pause is in progress
# What the permanent generation held when this module was imported: CPython 3.12 starts with a few hundred
# tuples there. More than that later means the process froze objects itself.
_FROZEN_AT_IMPORT = gc.get_freeze_count()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collection inside, nor while any other :func:`paused` is in progress."""
    with _lock:
        _pause()
    try:
        yield
    finally:
        with _lock:
            _unpause()


def _pause() -> None:
    global _depth, _resume
    if _depth == 0:
        _resume = gc.isenabled()
        gc.disable()
    _depth += 1


def _unpause() -> None:
    global _depth
    _depth -= 1
    if _depth == 0 and _resume:
        gc.enable()


def begin_start_up() -> None:
    """Pause collection until :func:`end_start_up`, as :func:`paused` does; a no-op while that pause is on
    (``jaxckpt train`` begins it before its imports, ``trainer.train`` again at its entry)."""
    global _start_up
    with _lock:
        if not _start_up:
            _start_up = True
            _pause()


def end_start_up(freeze_alive: bool = True) -> None:
    """End :func:`begin_start_up`'s pause, if one is on; with ``freeze_alive``, :func:`freeze` what start-up
    left alive first, so that no collection walks it until the next :func:`thaw`."""
    global _start_up
    with _lock:
        if not _start_up:
            return
        _start_up = False
    if freeze_alive:
        freeze()
    with _lock:
        _unpause()


def freeze() -> None:
    """Exempt every object alive now from cyclic collection until :func:`thaw`, unless the process froze
    objects itself since this module's import (that freeze is its own to undo) or a freeze of ours is in place."""
    global _frozen
    with _lock:
        if not _frozen and gc.get_freeze_count() <= _FROZEN_AT_IMPORT:
            gc.freeze()
            _frozen = True


def thaw() -> None:
    """Undo :func:`freeze` (no-op if it froze nothing): the objects go back to the oldest generation."""
    global _frozen
    with _lock:
        if _frozen:
            gc.unfreeze()
            _frozen = False
