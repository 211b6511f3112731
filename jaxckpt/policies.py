"""Save and retention policies as small objects, built from ``CheckpointConfig``.

Save policies answer "save at this step boundary?"; retention policies answer "which committed
checkpoints stay, and why?". Both take time from an injected clock so tests never sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from jaxckpt.config import CheckpointConfig

Clock = Callable[[], float]


class SavePolicy(Protocol):
    def should_save(self, step: int, now: float, last_save_step: int | None, last_save_time: float) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    n: int

    def should_save(self, step: int, now: float, last_save_step: int | None, last_save_time: float) -> bool:
        return step > 0 and step % self.n == 0


@dataclass(frozen=True)
class EveryNSeconds:
    seconds: float

    def should_save(self, step: int, now: float, last_save_step: int | None, last_save_time: float) -> bool:
        return step > 0 and now - last_save_time >= self.seconds


@dataclass
class SaveSchedule:
    """Whichever of the policies fires first; never saves the same step twice."""

    policies: list[SavePolicy]
    clock: Clock = time.monotonic
    last_save_step: int | None = None
    last_save_time: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.last_save_time = self.clock()

    def should_save(self, step: int) -> bool:
        if step == self.last_save_step:
            return False
        now = self.clock()
        return any(p.should_save(step, now, self.last_save_step, self.last_save_time) for p in self.policies)

    def saved(self, step: int) -> None:
        self.last_save_step, self.last_save_time = step, self.clock()


def save_schedule(cfg: CheckpointConfig, clock: Clock = time.monotonic) -> SaveSchedule:
    policies: list[SavePolicy] = []
    if cfg.every_steps:
        policies.append(EveryNSteps(cfg.every_steps))
    if cfg.every_seconds:
        policies.append(EveryNSeconds(cfg.every_seconds))
    return SaveSchedule(policies, clock)


@dataclass(frozen=True)
class Retention:
    """Keep the newest ``latest``, every ``every``-th step forever, and the ``best`` by a metric."""

    latest: int
    every: int = 0
    best: int = 0
    metric: str = "eval_loss"
    mode: str = "min"

    def reasons(self, steps: list[int], metrics: dict[int, dict[str, float]]) -> dict[int, list[str]]:
        """Each step mapped to the reasons it is kept (an empty list means: delete it)."""
        out: dict[int, list[str]] = {s: [] for s in steps}
        for s in sorted(steps)[max(len(steps) - self.latest, 0) :] if self.latest > 0 else []:
            out[s].append(f"latest {self.latest}")
        if self.every:
            for s in steps:
                if s % self.every == 0:
                    out[s].append(f"every {self.every}")
        if self.best:
            scored = [(metrics[s][self.metric], s) for s in steps
                      if not math.isnan(metrics.get(s, {}).get(self.metric, math.nan))]
            scored.sort(reverse=self.mode == "max")
            for _, s in scored[: self.best]:
                out[s].append(f"best {self.best} by {self.metric}")
        return out


def retention(cfg: CheckpointConfig) -> Retention:
    return Retention(cfg.keep_latest, cfg.keep_every, cfg.keep_best, cfg.best_metric, cfg.best_mode)
