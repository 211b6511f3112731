"""Logging for people and machines: progress bar, ``metrics.jsonl``, TensorBoard events."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax


def log(msg: str) -> None:
    """One human-readable line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(f"[jaxckpt] {msg}", file=sys.stderr)  # keeps an active progress bar intact


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard if enabled."""

    def __init__(self, workdir: Path, tensorboard: bool, progress: bool, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._file = open(self.path, "a") if self.enabled else None
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
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
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
            self._file.close()


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
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")


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
