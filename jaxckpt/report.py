"""``jaxckpt report DIR``: a run's history across restarts, from ``events.jsonl`` and ``metrics.jsonl``.

Segments are the stretches between ``start`` events (one per process launch). For each: wall time
(process start -> last record), start-up, restore, first step (compilation), checkpoint blocking,
steps run, and steps lost (run but not kept: the next segment resumed from an earlier step).
Goodput = time spent on steps that were kept / total wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxckpt.metrics import read_jsonl


@dataclass
class Segment:
    process_start: float
    start_time: float
    start_step: int = 0
    last_time: float = 0.0
    last_step: int = 0
    restore_s: float = 0.0
    init_s: float = 0.0
    first_step_s: float = 0.0
    blocking_s: float = 0.0
    checkpoints: list[int] = field(default_factory=list)
    ending: str = "killed"
    kept_steps: int = 0

    @property
    def wall_s(self) -> float:
        return max(self.last_time - self.process_start, 0.0)

    @property
    def steps_run(self) -> int:
        return max(self.last_step - self.start_step, 0)

    @property
    def step_time_s(self) -> float:
        """Time in training steps: wall minus start-up, restore, compilation and save blocking."""
        overhead = (self.start_time - self.process_start) + self.restore_s + self.init_s + self.first_step_s
        return max(self.wall_s - overhead - self.blocking_s, 0.0)


def _apply(seg: Segment, ev: dict[str, Any]) -> None:
    kind = ev["event"]
    seg.last_time = max(seg.last_time, ev["time"])
    if kind in ("restore", "init"):
        seg.start_step = seg.last_step = ev["step"]
        setattr(seg, f"{kind}_s", ev["seconds"])
    elif kind == "first_step":
        seg.first_step_s = ev["seconds"]
    elif kind == "checkpoint":
        seg.blocking_s += ev["blocking"]
        seg.checkpoints.append(ev["step"])
    elif kind in ("end", "preempted"):
        seg.ending = kind


def segments(workdir: Path) -> list[Segment]:
    """Rebuild the segments of a run; metrics rows extend each segment's last step and time."""
    events = read_jsonl(Path(workdir) / "events.jsonl")
    rows = read_jsonl(Path(workdir) / "metrics.jsonl")
    segs: list[Segment] = []
    for ev in events:
        if ev["event"] == "start":
            segs.append(Segment(ev.get("process_start", ev["time"]), ev["time"], last_time=ev["time"]))
        elif segs:
            _apply(segs[-1], ev)
    starts = [s.start_time for s in segs] + [float("inf")]
    for row in rows:
        for i, seg in enumerate(segs):
            if starts[i] <= row["time"] < starts[i + 1]:
                seg.last_step = max(seg.last_step, int(row["step"]))
                seg.last_time = max(seg.last_time, row["time"])
    for i, seg in enumerate(segs):
        nxt = segs[i + 1].start_step if i + 1 < len(segs) else seg.last_step
        seg.kept_steps = max(min(seg.last_step, nxt) - seg.start_step, 0)
    return segs


def summarize(segs: list[Segment]) -> dict[str, float]:
    wall = sum(s.wall_s for s in segs)
    useful = sum(s.step_time_s * s.kept_steps / s.steps_run for s in segs if s.steps_run)
    return {
        "restarts": max(len(segs) - 1, 0),
        "wall_s": wall,
        "step_s": sum(s.step_time_s for s in segs),
        "startup_s": sum(s.start_time - s.process_start for s in segs),
        "compile_s": sum(s.first_step_s for s in segs),
        "restore_s": sum(s.restore_s for s in segs),
        "checkpoint_blocking_s": sum(s.blocking_s for s in segs),
        "steps_lost": sum(s.steps_run - s.kept_steps for s in segs),
        "final_step": segs[-1].last_step if segs else 0,
        "goodput": useful / wall if wall else 0.0,
    }


def table(workdir: Path) -> str:
    segs = segments(workdir)
    if not segs:
        return f"no events in {workdir} (was it trained with jaxckpt?)"
    head = (f"{'#':>2} {'steps':>13} {'wall s':>8} {'startup':>8} {'restore':>8} {'compile':>8} "
            f"{'ckpt blk':>8} {'in steps':>8} {'lost':>5}  ended")
    lines = [head]
    for i, s in enumerate(segs):
        lines.append(
            f"{i:>2} {f'{s.start_step}->{s.last_step}':>13} {s.wall_s:>8.1f} {s.start_time - s.process_start:>8.1f} "
            f"{s.restore_s:>8.2f} {s.first_step_s:>8.2f} {s.blocking_s:>8.2f} {s.step_time_s:>8.1f} "
            f"{s.steps_run - s.kept_steps:>5}  {s.ending}"
        )
    t = summarize(segs)
    lines.append(
        f"total: {t['wall_s']:.1f}s wall, {t['step_s']:.1f}s in steps, {t['restarts']} restart(s), "
        f"{t['steps_lost']} step(s) lost, final step {t['final_step']}, goodput {100 * t['goodput']:.1f}%"
    )
    return "\n".join(lines)


def plot(workdir: Path, out: Path) -> Path:
    """Loss curve per segment, with checkpoint markers and restart lines, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = segments(workdir)
    rows = read_jsonl(Path(workdir) / "metrics.jsonl")
    starts = [s.start_time for s in segs] + [float("inf")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, seg in enumerate(segs):
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and starts[i] <= r["time"] < starts[i + 1]]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1.2, label=f"segment {i} ({seg.ending})")
        if i > 0:
            ax.axvline(seg.start_step, color="red", ls="--", lw=1)
            ax.annotate(f"restart {i} @ {seg.start_step}", (seg.start_step, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8, color="red")
        ck = seg.checkpoints
        ax.plot(ck, [_loss_at(rows, c) for c in ck], "kv", ms=5, label="checkpoint" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{Path(workdir).name}: loss across restarts (goodput {100 * summarize(segs)['goodput']:.1f}%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _loss_at(rows: list[dict[str, Any]], step: int) -> float:
    vals = [r["loss"] for r in rows if r.get("step") == step and "loss" in r]
    return vals[-1] if vals else float("nan")
