"""Wrapping one of Orbax's internal functions, once per process, only where it is the one jaxckpt knows.

jaxckpt replaces four steps of Orbax's save with leaner ones (:mod:`jaxckpt.d2h`, :mod:`jaxckpt.shard_writes`,
:mod:`jaxckpt.sharding_file`, :mod:`jaxckpt.substores`). Each wraps an Orbax function that is not public API; an
Orbax whose function differs keeps its own, with a warning, and saves stay correct, only slower.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp

ORIGINAL = "jaxckpt_orbax"  # the attribute of a wrapper that holds Orbax's own function
# True while jaxckpt's handler (jaxckpt.d2h.LeanArrayHandler) serializes: wrappers that have no other mark of
# its saves take their lean path only then.
LEAN_SAVE: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxckpt_lean_save", default=False)


def wrap_once(owner: Any, name: str, why_not: Callable[[Callable[..., Any]], str | None],
              wrap: Callable[[Callable[..., Any]], Callable[..., Any]], otherwise: str, logger: str) -> bool:
    """Put ``wrap(fn)`` in place of ``owner.name`` (``fn``), unless it is there already (True) or
    ``why_not(fn)`` gives a reason, which is logged to ``logger`` with what happens ``otherwise`` (False)."""
    current = getattr(owner, name)
    if hasattr(current, ORIGINAL):
        return True
    why = why_not(current)
    if why is not None:
        logging.getLogger(logger).warning("orbax-checkpoint %s: %s; %s", getattr(ocp, "__version__", "?"), why,
                                          otherwise)
        return False
    wrapper = wrap(current)
    setattr(wrapper, ORIGINAL, current)
    setattr(owner, name, wrapper)
    return True


def params_are(fn: Callable[..., Any], expected: tuple[str, ...]) -> str | None:
    """None if ``fn``'s parameters are ``expected``, else why not."""
    params = tuple(inspect.signature(fn).parameters)
    return None if params == expected else f"{fn.__name__}{params} is not {expected}"
