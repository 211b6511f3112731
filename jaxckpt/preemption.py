"""Preemption: SIGTERM/SIGINT become a request to save at the next step boundary and exit 143.

A second SIGINT aborts at once. With ``jax.distributed`` up (several processes), JAX's own
preemption sync point makes every host stop at the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax

from jaxckpt.errors import EXIT_PREEMPTED, Preempted  # noqa: F401 - re-exported
from jaxckpt.metrics import log


class PreemptionGuard:
    """Installs signal handlers (main thread only) and answers ``should_stop(step)``."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None and signum == signal.SIGINT:
            log(f"second {name}: aborting now; committed checkpoints are intact, the pending one is dropped")
            os._exit(130)
        if self.signame is None:
            self.signame = name
            log(f"{name} received: saving a checkpoint at the next step boundary, then exiting "
                f"(send SIGINT again to abort at once)")

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            # Under jax.distributed, JAX's runtime owns SIGTERM and its sync point is the signal.
            sigs = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
            for sig in sigs:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signame is not None
