"""``jaxckpt report``: restarts, lost steps and goodput counted from a run interrupted twice."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxckpt import report
from jaxckpt.config import load_config
from jaxckpt.data import prepare
from jaxckpt.trainer import train

STEPS = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0->8 (checkpoints 5 and 8; 8 then lost as if killed before it committed), 5->12 (stopped), 12->16."""
    root = tmp_path_factory.mktemp("report")
    text = root / "corpus.txt"
    text.write_text("".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(4000)))
    prepare([text], root / "ds")
    overrides = [f"data.path={root / 'ds'}", f"train.steps={STEPS}", "checkpoint.every_steps=5", "train.log_every=1",
                 "train.eval_every=0", "train.progress=false", "train.tensorboard=false", "model.d_model=32",
                 "model.n_layers=1", "model.seq_len=32", "train.compilation_cache=",
                 "data.batch_size=8"]
    cfg = load_config(None, overrides)
    w = root / "run"
    train(cfg, w, stop_at=8)
    shutil.rmtree(w / "checkpoints" / "8")  # a kill before step 8's checkpoint committed: steps 6-8 are lost
    train(cfg, w, stop_at=12)
    train(cfg, w)
    return w


def test_segments_count_restarts_and_lost_steps(workdir: Path) -> None:
    segs = report.segments(workdir)
    assert [(s.start_step, s.last_step) for s in segs] == [(0, 8), (5, 12), (12, STEPS)]
    assert [s.steps_run - s.kept_steps for s in segs] == [3, 0, 0]
    assert [s.checkpoints for s in segs] == [[5, 8], [10, 12], [15, 16]]
    assert segs[0].restore_s == 0 and segs[1].restore_s > 0 and all(s.first_step_s > 0 for s in segs)


def test_summary_agrees_with_the_events(workdir: Path) -> None:
    segs = report.segments(workdir)
    t = report.summarize(segs)
    assert (t["restarts"], t["steps_lost"], t["final_step"]) == (2, 3, STEPS)
    wall = sum(s.wall_s for s in segs)
    assert t["wall_s"] == pytest.approx(wall)
    useful = sum(s.step_time_s * s.kept_steps / s.steps_run for s in segs)
    assert t["goodput"] == pytest.approx(useful / wall)
    assert 0 < t["goodput"] < 1
    # Time in steps never exceeds the wall time of its segment, and lost work lowers goodput.
    assert all(0 <= s.step_time_s <= s.wall_s for s in segs)
    assert t["goodput"] < sum(s.step_time_s for s in segs) / wall


def test_table_and_plot(workdir: Path, tmp_path: Path) -> None:
    text = report.table(workdir)
    assert "2 restart(s), 3 step(s) lost, final step 16" in text
    png = report.plot(workdir, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_preempted_segment_is_marked(tmp_path: Path) -> None:
    """A segment that ended in a preemption save is reported as such, not as killed."""
    from jaxckpt.metrics import EventLog

    log = EventLog(tmp_path)
    log.emit("start", process_start=0.0)
    log.emit("init", step=0, seconds=0.1)
    log.emit("preempted", step=3)
    assert report.segments(tmp_path)[0].ending == "preempted"


def test_process_start_is_when_the_process_was_spawned() -> None:
    """A segment's start-up time (and the restart benchmark's latency) begins at the child's creation: no
    earlier than its parent spawned it (psutil's whole-second boot time put it up to 1 s before), and no
    later than its first line of Python."""
    code = ("import time; t = time.time(); from jaxckpt.trainer import process_start_time; "
            "print(process_start_time(), t)")
    for _ in range(3):
        spawned = time.time()
        start, first_line = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                      text=True, check=True).stdout.split())
        assert spawned - 0.02 <= start <= first_line, (start - spawned, first_line - spawned)
