"""Logging for people and machines: progress bar, ``metrics.jsonl``, TensorBoard events."""

from __future__ import annotations

import errno
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax


def log(msg: str) -> None:
    """One human-readable line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(f"[jaxckpt] {msg}", file=sys.stderr)  # keeps an active progress bar intact


def _is_library_noise(record: logging.LogRecord) -> bool:
    """Orbax/Grain background-thread chatter and asyncio's exit-time reports: for the log file only."""
    path = record.pathname.replace("\\", "/")
    return "/orbax/" in path or "/grain/" in path or record.name in ("asyncio", "jaxckpt.library")


class _QuietFileHandler(logging.FileHandler):
    """A log file that never prints "--- Logging error ---" (e.g. when it sits on the full disk)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's API
        pass


def _not_library_noise(record: logging.LogRecord) -> bool:
    return not _is_library_noise(record)


def route_library_logs(workdir: Path) -> None:
    """Send Orbax/Grain/asyncio log records to ``WORKDIR/library.log``; keep stderr for people.

    A failed save (a full disk) otherwise prints several tracebacks from Orbax's threads around our
    one-line error.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "jaxckpt", False):
            root.removeHandler(h)
            h.close()
        elif isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.addFilter(_not_library_noise)  # e.g. a basicConfig handler some library installed
    to_file = _QuietFileHandler(Path(workdir) / "library.log", delay=True)
    to_file.addFilter(_is_library_noise)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.addFilter(_not_library_noise)
    for h in (to_file, to_stderr):
        h.setLevel(logging.WARNING)
        h.jaxckpt = True  # type: ignore[attr-defined]
        root.addHandler(h)
    # Errors in library threads (Orbax's writers) and at interpreter exit go to the same file.
    library = logging.getLogger("jaxckpt.library")
    threading.excepthook = lambda a: library.error(
        "uncaught exception in thread %s", getattr(a.thread, "name", "?"), exc_info=(a.exc_type, a.exc_value,
                                                                                     a.exc_traceback))
    sys.unraisablehook = lambda u: library.error(
        "ignored exception in %r", u.object, exc_info=(u.exc_type, u.exc_value, u.exc_traceback))


class JsonlAppender:
    """Appends whole JSON lines: a row torn by a kill is dropped on open, a failed write is undone."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a+b", buffering=0)
        data_end = self._f.seek(0, 2)
        if data_end:
            self._f.seek(max(data_end - 65536, 0))
            tail = self._f.read()
            if not tail.endswith(b"\n"):
                self._f.truncate(data_end - len(tail) + tail.rfind(b"\n") + 1)

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row) + "\n").encode()
        start = self._f.seek(0, 2)
        try:
            if self._f.write(data) != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (short write)", str(self.path))
        except OSError:
            self._f.truncate(start)
            raise

    def close(self) -> None:
        self._f.close()


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard if enabled."""

    def __init__(self, workdir: Path, tensorboard: bool, progress: bool, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._file = JsonlAppender(self.path) if self.enabled else None
        self._warned = False
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30)
        self._bar = None
        if self.enabled and progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0.5)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}, "time": time.time()}
        if self._file is not None:
            try:
                self._file.append(row)
            except OSError as e:  # e.g. a full disk: the row is dropped whole, later rows are tried again
                if not self._warned:
                    log(f"WARNING: cannot write {self.path} ({e}); rows are skipped while this lasts, "
                        "training goes on")
                    self._warned = True
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), step)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the warning was given on write


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(workdir) / "metrics.jsonl")


class EventLog:
    """``events.jsonl``: what happened when (starts, restores, first step, checkpoints, exits).

    ``jaxckpt report`` rebuilds a run's history across restarts from it.
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / "events.jsonl"
        self.enabled = jax.process_index() == 0

    def emit(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        try:
            out = JsonlAppender(self.path)
            try:
                out.append({"event": kind, "time": time.time(), **fields})
            finally:
                out.close()
        except OSError as e:
            log(f"WARNING: cannot write {self.path} ({e}); the run's event history will have a gap")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill mid-write
    return rows
