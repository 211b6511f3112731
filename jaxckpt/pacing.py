"""Write pacing: a save beside CPU training writes its arrays in windows, not in one burst.

On the CPU backend the train step and the save share the cores. XLA keeps both of a small machine's
cores busy, and whatever CPU a save takes (TensorStore copying into the page cache, Orbax's per-array
Python) comes out of the step running beside it, whatever the save threads' priority: XLA's threads wait
for each other at every op, and a kernel without preemption (``preempt=none``, as on the 2-core VM of
benchmarks/README.md) finishes a write call before a woken XLA thread runs. Written at once, a 129 MB save
made one step 1.34-1.57x as long there; admitted at 16 MB per 0.5 s, the slowest step beside it was
1.14-1.19x in 6 of 8 runs, 1.26x and 1.29x in the other two (benchmarks/README.md §2).

A :class:`WritePacer` is the byte limiter Orbax consults before each array write
(``ParamInfo.byte_limiter``): it admits up to ``rate * period`` bytes per window, the next window opening
``period`` later (or later still, so that one large array keeps the average rate). The first opens one
period after the save's first request, so that what Orbax sets up for all arrays before that request and the
first writes fall in different steps. Each array's own set-up (TensorStore's opens, its metadata write) waits
for the array's window with its writes (:func:`jaxckpt.shard_writes.write_at_once`).

Orbax's handler writes without an OCDBT transaction anyway (its default limit of 96 GB in flight is a byte
limiter too): OCDBT commits the writes pending together, in batches.
Writes admitted in one window are pending together, so a window is one batch or a few: the same standard
Orbax checkpoint in a few more files. :meth:`WritePacer.lift` lets the rest through at once (whoever
waits for the save: the next save, a preemption, the end of training).

A waiting write sleeps until its window opens, woken early only by :meth:`WritePacer.lift`. An earlier
version woke every 50 ms to look: with the small config's 172 arrays all waiting from the start, those wake-ups
took 0.05-0.1 CPU-s per save, out of the train steps beside it (benchmarks/README.md §2, seventeenth session).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import jax
from orbax.checkpoint._src.serialization import limits

PERIOD_S = 0.5


class WritePacer(limits.ByteLimiter):
    """Admits writes in windows of at most ``mb_per_s * period_s`` MB, one window every ``period_s``."""

    def __init__(self, mb_per_s: float, period_s: float = PERIOD_S, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] | None = None):
        """``sleep(seconds)``: how a waiting write waits (tests pass a fake; by default until lift())."""
        if mb_per_s <= 0 or period_s <= 0:
            raise ValueError(f"a pace needs a positive rate and period, not {mb_per_s} MB/s every {period_s} s")
        self.rate, self.burst, self.period = mb_per_s * 1e6, mb_per_s * 1e6 * period_s, period_s
        self._clock, self._sleep = clock, sleep or self._sleep_unless_lifted
        self._opens: float | None = None  # when the current window opens
        self._used = 0.0  # bytes admitted in the current window
        self.lifted = False
        self.windows = 0  # windows opened so far (tests read it)
        self._lock = threading.Lock()  # lift() comes from another thread than Orbax's event loop
        self._wakers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def _window_for(self, n: int) -> float:
        """The opening time of the window that admits ``n`` more bytes (the current one, or a new one)."""
        if self._opens is None:  # after Orbax's set-up for the arrays (see the module doc)
            self._opens, self.windows = self._clock() + self.period, 1
        elif self._used > 0 and self._used + n > self.burst:
            self._opens += max(self.period, self._used / self.rate)
            self._used, self.windows = 0.0, self.windows + 1
        self._used += n
        return self._opens

    async def wait_for_bytes(self, requested_bytes: int) -> None:
        opens = self._window_for(requested_bytes)
        while not self.lifted and (left := opens - self._clock()) > 0:
            await self._sleep(left)

    async def release_bytes(self, requested_bytes: int) -> None:
        del requested_bytes  # windows pace starts; finished writes free nothing

    async def _sleep_unless_lifted(self, seconds: float) -> None:
        """Sleep ``seconds``, or until :meth:`lift`: one timer per waiting write, no polling."""
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self.lifted:
                return
            self._wakers.add(waker)
        try:
            async with asyncio.timeout(seconds):
                await waker[1].wait()
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._wakers.discard(waker)

    def lift(self) -> None:
        """Admit everything from now on, and wake the writes waiting (thread-safe)."""
        with self._lock:
            self.lifted = True
            wakers = list(self._wakers)
        for loop, event in wakers:
            with contextlib.suppress(RuntimeError):  # that write's event loop has closed
                loop.call_soon_threadsafe(event.set)


_CURRENT: contextvars.ContextVar[WritePacer | None] = contextvars.ContextVar("jaxckpt_write_pacer", default=None)


def current() -> WritePacer | None:
    """The pacer of the save being started on this thread (see :func:`pacing`), if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def pacing(pacer: WritePacer | None) -> Iterator[None]:
    """``with pacing(pacer):`` array writes of saves started inside it go through ``pacer`` (None: unpaced)."""
    token = _CURRENT.set(pacer)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def shares_cores() -> bool:
    """Whether the train step runs on the host's cores (the CPU backend), which a save's writes then take."""
    return jax.default_backend() == "cpu"
