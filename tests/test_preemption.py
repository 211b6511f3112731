"""Preemption against the real CLI: SIGTERM saves at the step boundary and exits 143; a second SIGINT aborts.

A preempted run resumed with the same command must match the uninterrupted reference run bit for bit.
"""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

import faultlib
import pytest
from faultlib import STEPS, Setup

NO_PERIODIC = ["checkpoint.every_steps=1000"]  # the only checkpoint is the one preemption writes


pytestmark = pytest.mark.usefixtures("no_stray_processes")


def _assert_preempted(workdir: Path, rc: int, out: str, signame: str = "SIGTERM") -> int:
    """Exit 143 with a durable, verified checkpoint at exactly the last completed step; returns that step."""
    assert rc == 143, f"exit {rc}\n{out}"
    last = faultlib.max_logged_step(workdir)
    assert f"preempted by {signame}: checkpoint at step {last} is durable" in out, out
    newest = faultlib.manifest_steps(workdir)
    assert newest and newest[-1] == last, f"checkpoints {faultlib.step_dirs(workdir)}, last logged step {last}"
    for s in newest:
        assert not faultlib.verify_problems(workdir, s), faultlib.verify_problems(workdir, s)
    assert faultlib.no_traceback(out), out
    return last


def _resume_to_end(setup: Setup, at: int, resume: faultlib.Proc) -> None:
    """Run the prewarmed resume command to the end: it continues from ``at`` and matches the reference."""
    workdir = Path(resume.args[resume.args.index("--workdir") + 1])
    rc, out = setup.train(workdir, prewarmed=resume)
    assert rc == 0, out
    assert faultlib.resumed_from(out) == at, out
    faultlib.assert_matches_reference(workdir, setup.reference)


def test_sigterm_mid_training_costs_zero_steps(setup: Setup, tmp_path: Path) -> None:
    """No periodic saves: SIGTERM after a few steps must checkpoint exactly the last completed step."""
    workdir = tmp_path / "w"
    resume = setup.spawn(workdir, *NO_PERIODIC)
    p = setup.start(workdir, *NO_PERIODIC)
    assert p.wait_until(lambda: faultlib.rows_written(workdir) >= 3), p.tail()
    p.signal(signal.SIGTERM)
    rc = p.finish()
    last = _assert_preempted(workdir, rc, p.output)
    assert 3 <= last < STEPS, f"SIGTERM should land mid-run; checkpoint at {last}"
    assert faultlib.manifest_steps(workdir) == [last]
    _resume_to_end(setup, last, resume)


def test_sigterm_right_after_startup(setup: Setup, tmp_path: Path) -> None:
    """SIGTERM as soon as the trainer is up (before its first step is compiled): 143 and a usable checkpoint."""
    workdir = tmp_path / "w"
    resume = setup.spawn(workdir, *NO_PERIODIC)
    p = setup.start(workdir, *NO_PERIODIC)
    p.on_line(faultlib.START_LINE, lambda _line: p.signal(signal.SIGTERM))
    rc = p.finish()
    last = _assert_preempted(workdir, rc, p.output)
    print(f"SIGTERM after start-up: checkpoint at step {last}")
    _resume_to_end(setup, last, resume)


def test_sigterm_during_first_save(setup: Setup, tmp_path: Path) -> None:
    """With a save at every step, SIGTERM at the first logged step lands while a save is in flight."""
    workdir = tmp_path / "w"
    resume = setup.spawn(workdir, *NO_PERIODIC)
    p = setup.start(workdir, "checkpoint.every_steps=1")
    assert p.wait_until(lambda: faultlib.rows_written(workdir) >= 1), p.tail()
    p.signal(signal.SIGTERM)
    rc = p.finish()
    last = _assert_preempted(workdir, rc, p.output)
    print(f"SIGTERM during first save: checkpoint at step {last}, committed {faultlib.manifest_steps(workdir)}")
    # Checkpoint settings may change across a resume; training must not notice.
    _resume_to_end(setup, last, resume)


def _lock_held(workdir: Path) -> bool:
    """Whether a trainer still holds ``workdir``'s lock (probed without keeping it)."""
    fd = os.open(workdir / faultlib.LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the lock if the probe got it
    return False


def test_second_sigint_aborts_at_once(setup: Setup, tmp_path: Path) -> None:
    """First SIGINT: save-and-exit requested. Second SIGINT while that save runs: exit 130 now, commits intact.

    The second SIGINT is sent the moment the first one's log line is read. The trainer holds its workdir
    lock inside its signal guard, so a lock still held right after the second ``kill()`` proves the signal
    came in time; if it provably came late (the run was already done), the attempt is repeated.
    """
    for attempt in range(1, 4):
        workdir = tmp_path / f"w{attempt}"
        p = setup.start(workdir, "checkpoint.every_steps=2")
        ready = lambda w=workdir: bool(faultlib.manifest_steps(w)) and faultlib.rows_written(w) >= 5
        assert p.wait_until(ready), p.tail()
        probe: dict[str, bool] = {}

        def second(_line: str, p: faultlib.Proc = p, w: Path = workdir, probe: dict[str, bool] = probe) -> None:
            p.signal(signal.SIGINT)
            probe["in time"] = _lock_held(w)

        p.on_line("SIGINT received", second)
        p.signal(signal.SIGINT)
        rc = p.finish()
        out = p.output
        print(f"attempt {attempt}: exit {rc}, second SIGINT in time: {probe.get('in time')}")
        if probe.get("in time") is False:
            continue  # the run had already finished its preemption save: nothing was tested
        break
    assert probe.get("in time"), f"first SIGINT not acknowledged in the log\n{out}"
    assert rc == 130, f"exit {rc}\n{out}"
    assert "second SIGINT: aborting now" in out and "preempted by" not in out, out
    assert faultlib.no_traceback(out), out
    committed = faultlib.manifest_steps(workdir)
    assert committed, faultlib.step_dirs(workdir)
    for s in committed:
        assert not faultlib.verify_problems(workdir, s), faultlib.verify_problems(workdir, s)
    resume = setup.spawn(workdir, *NO_PERIODIC)  # checkpoint settings may change across a resume
    _resume_to_end(setup, committed[-1], resume)
