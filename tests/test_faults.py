"""Fault injection against the real CLI: SIGKILL anywhere, corrupted checkpoints, a full disk, two trainers.

Every scenario ends the same way: the run that survived the fault must match an uninterrupted reference
run bit for bit (every logged loss with ``==``, the final checkpoint's arrays with ``np.array_equal``).
Random kill times come from a printed seed; set ``JAXCKPT_FAULT_SEED`` to replay one.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faultlib
import pytest
from faultlib import STEPS, Proc, Setup

from jaxckpt.checkpoint import TODELETE

CHAIN = ["checkpoint.every_steps=2"]  # saves at every other step: most kills land inside a save
FAST = ["checkpoint.every_steps=1000"]  # only the final checkpoint
MAX_KILLS = 12
MIN_KILLS = 10


pytestmark = pytest.mark.usefixtures("no_stray_processes")


# -- 1. SIGKILL at random moments ---------------------------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL: where it landed, for the printed log."""

    chain: int
    segment: int
    trigger: str
    delay: float
    at: float  # seconds since the process started
    last_step: int  # highest step logged when it died
    last_line: str

    def __str__(self) -> str:
        return (f"chain {self.chain} seg {self.segment}: after {self.trigger!r} + {self.delay:.3f}s "
                f"(t={self.at:.2f}s, last logged step {self.last_step}, last line {self.last_line[:70]!r})")


def _kill_inside_syscall(p: Proc, syscalls: str, paths: list[Path], pattern: str) -> int:
    """Resume the SIGSTOPped trainer ``p`` under strace and SIGKILL it when ``pattern`` shows up; its exit code."""
    tracer = faultlib.SyscallTracer(p.pid, syscalls, paths)
    try:
        tracer.wait_attached()
        tracer.proc.on_line(pattern, lambda _line: p.kill_group())
        p.signal(signal.SIGCONT)
        return p.finish()
    finally:
        tracer.close()


def _check_segment(workdir: Path, p: Proc, before: list[int], incomplete: list[int], where: str) -> None:
    """After one trainer process ended: it resumed from the newest committed step; incomplete ones were removed."""
    got = faultlib.resumed_from(p.output)
    if before:
        assert got is not None, f"{where}: did not resume although {before} were committed\n{p.tail()}"
        assert got in before, f"{where}: resumed from {got}, which had no manifest (committed: {before})"
        assert got == max(before), f"{where}: resumed from {got}, not the newest committed {max(before)}"
        for s in incomplete:
            assert f"removing incomplete checkpoint {s}:" in p.output, (
                f"{where}: incomplete step {s} was not reported and removed\n{p.tail()}")
    else:
        assert got is None, f"{where}: resumed from {got} but no step had a manifest\n{p.tail()}"


def _check_committed(workdir: Path, where: str) -> None:
    """Every step with a manifest verifies (what ``jaxckpt ckpt verify W --step S`` checks)."""
    for s in faultlib.manifest_steps(workdir):
        problems = faultlib.verify_problems(workdir, s)
        assert not problems, f"{where}: committed checkpoint {s} is damaged:\n{problems}"
    faultlib.read_rows(workdir)  # metrics.jsonl must still parse line by line (no torn rows)


def _run_chain(setup: Setup, workdir: Path, chain: int, rng: random.Random, budget: int,
               kills: list[Kill]) -> None:
    """Start/kill/restart the same command on ``workdir`` up to ``budget`` times, then let it finish.

    Each restart is imported while its predecessor still trains and told to go the moment that one died.
    """
    nxt = setup.spawn(workdir, *CHAIN, name=f"chain {chain} segment 1")
    for segment in range(1, budget + 2):
        before = faultlib.manifest_steps(workdir)
        incomplete = [s for s in faultlib.step_dirs(workdir) if s not in before]
        rows0 = faultlib.rows_written(workdir)
        where = f"chain {chain} segment {segment}"
        p = nxt.go()
        if segment > budget:
            rc = p.finish()
            assert rc == 0, f"{where}: final uninterrupted run failed ({rc})\n{p.tail()}"
            _check_segment(workdir, p, before, incomplete, where)
            return
        nxt = setup.spawn(workdir, *CHAIN, name=f"chain {chain} segment {segment + 1}")
        # The first kill waits for a durable checkpoint (a kill before it only repeats a fresh start);
        # later ones start their clock at start-up (restore done; compile and first save ahead),
        # at the first newly logged step, or at a checkpoint becoming durable.
        trigger = "checkpoint" if not before else rng.choice(["start-up", "step", "step", "checkpoint"])
        delay = round(rng.uniform(0.0, 1.5 if trigger == "start-up" else 1.0), 3)
        if trigger == "start-up":
            armed = p.wait_line(faultlib.START_LINE) is not None
        elif trigger == "step":
            armed = p.wait_until(lambda n=rows0: faultlib.rows_written(workdir) > n)
        else:
            armed = p.wait_line(r"\] checkpoint \d+: ") is not None
        killing = armed and p.sleep(delay)
        at = p.elapsed()
        if killing:
            p.kill_group()
        rc = p.finish()
        # rc 0 after a kill: the trainer exited on its own between sleep()'s last look and the kill (a
        # process that has exited keeps its exit status whatever is sent to it): it finished first.
        if killing and rc != 0:
            assert rc == -signal.SIGKILL, f"{where}: expected death by SIGKILL, got {rc}\n{p.tail()}"
            kill = Kill(chain, segment, trigger, delay, at, faultlib.max_logged_step(workdir),
                        p.lines[-1][1] if p.lines else "")
            kills.append(kill)
            print(f"SIGKILL #{len(kills)}: {kill}")
            _check_segment(workdir, p, before, incomplete, where)
            _check_committed(workdir, f"after SIGKILL #{len(kills)} ({kill})")
        else:  # finished before the kill time: this chain is done
            nxt.close()
            assert rc == 0, f"{where}: trainer failed ({rc}) before it could be killed\n{p.tail()}"
            _check_segment(workdir, p, before, incomplete, where)
            return


def test_sigkill_anywhere_resumes_bit_identical(setup: Setup, tmp_path: Path) -> None:
    """SIGKILL the trainer ≥10 times at random moments (training, async saves, manifests, retention)."""
    ref = setup.reference
    seed = int(os.environ.get("JAXCKPT_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    print(f"SIGKILL seed {seed} (replay with JAXCKPT_FAULT_SEED={seed})")
    rng, kills, chain = random.Random(seed), [], 0
    t0 = time.monotonic()
    while len(kills) < MIN_KILLS:
        chain += 1
        workdir = tmp_path / f"chain{chain}"
        _run_chain(setup, workdir, chain, rng, MAX_KILLS - len(kills) if chain == 1 else MIN_KILLS - len(kills),
                   kills)
        log = f"seed {seed}; kills:\n  " + "\n  ".join(map(str, kills)) + "\n"
        _check_committed(workdir, f"{log}after the chain")
        leftovers = [s for s in faultlib.step_dirs(workdir) if s not in faultlib.manifest_steps(workdir)]
        assert not leftovers, f"{log}step directories without a manifest left behind: {leftovers}"
        faultlib.assert_matches_reference(workdir, ref, context=log)
    print(f"{len(kills)} SIGKILLs in {chain} chain(s), {time.monotonic() - t0:.1f}s")


def test_sigkill_during_retention_delete_keeps_committed_checkpoints_intact(setup: Setup, tmp_path: Path) -> None:
    """SIGKILL while an old checkpoint's files are being deleted, held half-done by strace (deterministic).

    Retention takes checkpoint 2's manifest, moves it to ``checkpoints/.deleted/2`` and the next save (or
    the end of the run) deletes its files: the kill lands after the first of those deletions. Every step
    directory that still has a manifest must verify, and once the same command ran again no step
    directory without a manifest, and nothing set aside, may be left behind.
    """
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    workdir = tmp_path / "w"
    overrides = (*CHAIN, "checkpoint.keep_latest=2")  # checkpoint 2 is dropped once 6 is durable
    resume = setup.spawn(workdir, *overrides, name="rerun")
    p = setup.start(workdir, *overrides, name="victim")
    p.on_line(r"\] checkpoint 2: ", lambda _line: p.signal(signal.SIGSTOP))
    assert p.wait_line(r"\] checkpoint 2: ") is not None, p.tail()
    assert p.wait_until(lambda: faultlib.process_state(p.pid) == "T", timeout=30), p.tail()
    step2, aside = workdir / "checkpoints" / "2", workdir / "checkpoints" / TODELETE / "2"
    assert 2 in faultlib.manifest_steps(workdir) and not faultlib.verify_problems(workdir, 2), (
        "the trainer got past dropping checkpoint 2 before it could be stopped")
    paths = [*(aside / x.relative_to(step2) for x in sorted(step2.rglob("*"))), aside]
    rc = _kill_inside_syscall(p, "unlink,unlinkat,rmdir", paths, r"(unlink|rmdir).*= 0")
    assert rc == -signal.SIGKILL, f"the trainer never deleted files of {aside} (exit code {rc})\n{p.tail()}"
    gone = [str(x.relative_to(aside)) for x in paths[:-1] if not x.exists()]
    print(f"killed while deleting checkpoint 2: {len(gone)} of {len(paths) - 1} entries gone ({gone[:5]})")
    assert 2 not in faultlib.step_dirs(workdir) and aside.is_dir(), sorted(os.listdir(workdir / "checkpoints"))
    problems = [f"after the kill, committed step {s} does not verify: {x}"
                for s in faultlib.manifest_steps(workdir) for x in faultlib.verify_problems(workdir, s)]
    rc, out = setup.train(workdir, *overrides, prewarmed=resume)
    assert rc == 0, out
    leftovers = [s for s in faultlib.step_dirs(workdir) if s not in faultlib.manifest_steps(workdir)]
    if leftovers or aside.parent.exists():
        problems.append(f"after the rerun, left behind: steps without a manifest {leftovers}, "
                        f"set aside {sorted(os.listdir(aside.parent)) if aside.parent.exists() else []}")
    for s in faultlib.manifest_steps(workdir):
        problems += [f"after the rerun, step {s} does not verify: {x}" for x in faultlib.verify_problems(workdir, s)]
    faultlib.assert_matches_reference(workdir, setup.reference)
    assert not problems, "\n".join(problems)


def test_sigkill_before_first_manifest_then_same_command_works(setup: Setup, tmp_path: Path) -> None:
    """SIGKILL after Orbax committed the very first checkpoint but before its manifest was written.

    The step directory looks final but is incomplete (no manifest), and it is the only one. Re-running the
    same command must still work: nothing usable means start from scratch (setting the incomplete step
    aside), not "exit 2, move the directory aside yourself". With strace the kill is real and lands exactly
    there; without it the same on-disk state is made by removing the manifest of a finished first save.
    """
    workdir = tmp_path / "w"
    manifest = workdir / "checkpoints" / "2" / "jaxckpt_manifest.json"
    if shutil.which("strace"):
        p = setup.start(workdir, *CHAIN, name="victim")
        p.on_line(faultlib.START_LINE, lambda _line: p.signal(signal.SIGSTOP))
        assert p.wait_line(faultlib.START_LINE) is not None, p.tail()
        assert p.wait_until(lambda: faultlib.process_state(p.pid) == "T", timeout=30), p.tail()
        assert not faultlib.step_dirs(workdir), "the first save happened before the trainer could be stopped"
        rc = _kill_inside_syscall(p, "open,openat", [manifest.with_name(manifest.name + ".tmp")], r"open")
        assert rc == -signal.SIGKILL, f"exit {rc}\n{p.tail()}"
    else:
        rc, out = setup.train(workdir, *CHAIN, stop_at=2)
        assert rc == 0, out
        manifest.unlink()
    assert faultlib.step_dirs(workdir) == [2] and faultlib.manifest_steps(workdir) == [], faultlib.step_dirs(workdir)
    assert (workdir / "checkpoints" / "2" / "commit_success.txt").exists(), "Orbax had not committed step 2"
    rc, out = setup.train(workdir, *CHAIN)
    assert rc == 0, f"re-running the same command after the crash failed (exit {rc}):\n{out[-1500:]}"
    assert faultlib.resumed_from(out) is None, out
    faultlib.assert_matches_reference(workdir, setup.reference)


# -- 3. corrupted checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir stopped at step 24 holding checkpoints 12, 18 and 24 (copied by each test)."""
    workdir = tmp_path_factory.mktemp("corrupt") / "base"
    rc, out = setup.train(workdir, "checkpoint.every_steps=6", stop_at=24)
    assert rc == 0, out
    assert faultlib.manifest_steps(workdir) == [12, 18, 24], faultlib.step_dirs(workdir)
    return workdir


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_corrupt_checkpoints_detected_quarantined_and_skipped(
        setup: Setup, three_checkpoints: Path, tmp_path: Path) -> None:
    """A bit flip in the newest checkpoint and a truncation in the one before: verify names both files;
    resume warns about both, falls back to the newest good one, moves the bad ones aside and ends exactly."""
    workdir = tmp_path / "w"
    shutil.copytree(three_checkpoints, workdir)
    flipped = faultlib.largest_array_file(workdir / "checkpoints" / "24")
    truncated = faultlib.largest_array_file(workdir / "checkpoints" / "18")
    _flip_bit(flipped)
    _truncate(truncated)
    damaged = {flipped: flipped.read_bytes(), truncated: truncated.read_bytes()}
    trainer = setup.spawn(workdir, "checkpoint.every_steps=6")  # imports while verify runs

    rc, out = setup.cli("ckpt", "verify", str(workdir))
    assert rc == 1, out
    lines = out.splitlines()
    assert any(str(flipped) in ln and "checksum mismatch" in ln for ln in lines), out
    assert any(str(truncated) in ln and "truncated" in ln for ln in lines), out
    assert any(ln.split() == ["12", "OK"] for ln in lines), out

    rc, out = setup.train(workdir, prewarmed=trainer)
    assert rc == 0, out
    for step, bad in ((24, flipped), (18, truncated)):
        warning = next((ln for ln in out.splitlines() if f"checkpoint {step} is not usable" in ln), "")
        assert "WARNING" in warning and bad.name in warning, out
        moved = list((workdir / "quarantine").glob(f"{step}-*"))
        assert len(moved) == 1 and (moved[0] / "QUARANTINED.txt").is_file(), moved
        # Moved intact, damage and all, for a post-mortem; never deleted.
        rel = bad.relative_to(workdir / "checkpoints" / str(step))
        assert (moved[0] / rel).read_bytes() == damaged[bad]
    assert faultlib.resumed_from(out) == 12, out
    assert faultlib.no_traceback(out), out
    faultlib.assert_matches_reference(workdir, setup.reference)


def test_every_checkpoint_corrupt_exits_2_and_deletes_nothing(
        setup: Setup, three_checkpoints: Path, tmp_path: Path) -> None:
    """No usable checkpoint: exit 2 with an explanation; every step directory stays where it was."""
    workdir = tmp_path / "w"
    shutil.copytree(three_checkpoints, workdir)
    for step, damage in ((12, _truncate), (18, _flip_bit), (24, _flip_bit)):
        damage(faultlib.largest_array_file(workdir / "checkpoints" / str(step)))

    def listing() -> dict[str, int]:
        return {str(p.relative_to(workdir)): p.stat().st_size for p in (workdir / "checkpoints").rglob("*")}

    files = listing()
    rc, out = setup.train(workdir, "checkpoint.every_steps=6")
    assert rc == 2, out
    assert "is usable; nothing was deleted" in out, out
    assert all(f"{s}: " in out for s in (12, 18, 24)), out
    assert faultlib.no_traceback(out), out
    assert listing() == files, "files under checkpoints/ changed"
    assert faultlib.step_dirs(workdir) == [12, 18, 24]
    assert not (workdir / "quarantine").exists()


# -- 4. full disk ----------------------------------------------------------------------------------------


@contextmanager
def _tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A real small filesystem at ``path`` (tmpfs), so writes fail with a genuine ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to produce ENOSPC here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield path
    finally:
        faultlib.kill_all()
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _tight_size(setup: Setup) -> int:
    """Room for two checkpoints and a bit: the third save runs out of space."""
    return int(setup.reference.ckpt_bytes * 2.4)


@dataclass
class DiskFull:
    mount: Path
    workdir: Path
    rc: int
    out: str


@pytest.fixture(scope="module")
def disk_full_stop(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskFull]:
    """One run with ``on_save_error=stop`` on a filesystem that fills up at its third checkpoint."""
    mount = tmp_path_factory.mktemp("enospc-stop") / "mnt"
    with _tmpfs(mount, _tight_size(setup)):
        workdir = mount / "w"
        rc, out = setup.train(workdir, *CHAIN, "checkpoint.on_save_error=stop")
        yield DiskFull(mount, workdir, rc, out)


def _error_line(out: str) -> tuple[int, str]:
    """Index and text of the CLI's final error line (``jaxckpt: error: ...``), or (-1, "")."""
    lines = out.splitlines()
    hits = [i for i, ln in enumerate(lines) if ln.startswith("jaxckpt: error:")]
    return (hits[-1], lines[hits[-1]]) if hits else (-1, "")


def test_disk_full_stop_exits_1_with_clear_message(disk_full_stop: DiskFull) -> None:
    """``on_save_error=stop``: exit 1 and one ``jaxckpt: error:`` line that says what happened and what to do."""
    r = disk_full_stop
    assert r.rc == 1, r.out
    _, line = _error_line(r.out)
    assert line.startswith("jaxckpt: error: saving checkpoint") and "disk is full" in line, r.out[-3000:]
    assert "are intact" in line and "re-run the same command" in line, line


def test_disk_full_stop_output_is_not_a_traceback_wall(disk_full_stop: DiskFull) -> None:
    """The user sees one clear error line at the end, not pages of Orbax/absl/asyncio tracebacks."""
    r = disk_full_stop
    lines = r.out.splitlines()
    tracebacks = r.out.count("Traceback (most recent call last)")
    errors = [ln for ln in lines if ln.startswith(("ERROR:", "WARNING:absl", "E0", "F0"))]
    at, _ = _error_line(r.out)
    assert tracebacks == 0 and not errors and at == len(lines) - 1, (
        f"{len(lines)} lines of output: {tracebacks} Python tracebacks, {len(errors)} third-party error log "
        f"lines (e.g. {[e[:100] for e in errors[:2]]}), the jaxckpt error is line {at + 1} "
        f"with {len(lines) - 1 - at} lines after it")


def test_disk_full_stop_keeps_committed_checkpoints_and_resumes(setup: Setup, disk_full_stop: DiskFull) -> None:
    """Committed checkpoints verify, nothing half-written remains, and after freeing space the run ends exactly."""
    r = disk_full_stop
    committed = faultlib.manifest_steps(r.workdir)
    assert committed, r.out
    assert faultlib.step_dirs(r.workdir) == committed, "a half-written step directory was left behind"
    assert not [p.name for p in (r.workdir / "checkpoints").iterdir() if "tmp" in p.name], r.out[-5000:]
    for s in committed:
        assert not faultlib.verify_problems(r.workdir, s), faultlib.verify_problems(r.workdir, s)
    # Free space, then the same command resumes from the newest committed step and ends exactly.
    res = subprocess.run(["mount", "-o", "remount,size=64m", str(r.mount)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rc, out = setup.train(r.workdir, *CHAIN, "checkpoint.on_save_error=stop")
    assert rc == 0, out
    assert faultlib.resumed_from(out) == max(committed), out
    faultlib.assert_matches_reference(r.workdir, setup.reference)


def test_disk_full_continue_trains_to_the_end(setup: Setup, tmp_path: Path) -> None:
    """``on_save_error=continue``: saves after the disk fills fail, training still reaches the end exactly."""
    with _tmpfs(tmp_path / "mnt", _tight_size(setup)) as mount:
        workdir = mount / "w"
        rc, out = setup.train(workdir, *CHAIN, "checkpoint.on_save_error=continue")
        assert rc == 0, out
        assert "disk is full" in out and "training continues" in out, out
        # The disk stays full, so metrics rows after the failures may be dropped (whole, never torn);
        # every row that was written matches the reference, and the run reached the last step.
        losses = faultlib.last_losses(workdir)
        assert list(range(1, min(faultlib.manifest_steps(workdir)) + 1)) == sorted(losses)[: min(
            faultlib.manifest_steps(workdir))], "rows before the disk filled are missing"
        assert losses == {s: setup.reference.losses[s] for s in losses}, "failed saves changed training"
        assert f"done: step {STEPS}, loss {setup.reference.losses[STEPS]:.4f}" in out, out
        committed = faultlib.manifest_steps(workdir)
        assert committed and all(not faultlib.verify_problems(workdir, s) for s in committed), committed
        assert faultlib.step_dirs(workdir) == committed, "a half-written step directory was left behind"


def _fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s filesystem (a real ENOSPC for everyone else)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


def test_disk_filled_by_another_writer_while_training(setup: Setup, tmp_path: Path) -> None:
    """The disk fills up between checkpoints (something else wrote to it): the trainer's own log writes
    hit ENOSPC first. Expect the same clean stop as a failed save, an intact metrics log, and exact resume."""
    with _tmpfs(tmp_path / "mnt", 8 << 20) as mount:
        workdir = mount / "w"
        rerun = setup.spawn(workdir, *FAST)
        p = setup.start(workdir, *FAST)
        assert p.wait_until(lambda: faultlib.rows_written(workdir) >= 1), p.tail()
        filler = _fill(mount)
        rc = p.finish()
        out = p.output
        problems = []
        _, line = _error_line(out)
        if rc != 1:
            problems.append(f"exit code {rc}, expected 1")
        if "disk is full" not in line:
            problems.append(f"no clear 'jaxckpt: error: ... disk is full' line; last line: {out.splitlines()[-1:]}")
        if not faultlib.no_traceback(out):
            problems.append(f"{out.count('Traceback (most recent call last)')} Python traceback(s) in the output")
        try:
            faultlib.read_rows(workdir)
        except ValueError as e:
            problems.append(f"metrics.jsonl has a torn row: {e}")
        filler.unlink()
        rc2, out2 = setup.train(workdir, prewarmed=rerun)
        if rc2 != 0:
            problems.append(f"rerun after freeing space failed ({rc2}): {out2.strip().splitlines()[-1:]}")
        else:
            try:
                faultlib.assert_matches_reference(workdir, setup.reference)
            except (AssertionError, ValueError) as e:
                problems.append(f"rerun does not match the reference: {str(e)[:300]}")
        assert not problems, "\n".join(problems) + f"\n--- output of the run that hit the full disk ---\n{p.tail(25)}"


# -- 5. one trainer per workdir ---------------------------------------------------------------------


def test_second_trainer_on_same_workdir_refused_and_lock_freed_by_sigkill(setup: Setup, tmp_path: Path) -> None:
    """A second trainer on a busy workdir exits 2 at once; SIGKILL of the first frees the workdir."""
    workdir = tmp_path / "w"
    first = setup.start(workdir, *FAST, name="first trainer")
    second = setup.spawn(workdir, *FAST, name="second trainer")  # imports while the first starts
    third = setup.spawn(workdir, *FAST, name="third trainer")
    try:
        assert first.wait_line(faultlib.START_LINE) is not None, first.tail()
        first.signal(signal.SIGSTOP)  # holds the lock, makes no progress: no race with the second one
        t0 = time.monotonic()
        rc, out = setup.train(workdir, prewarmed=second)
        took = time.monotonic() - t0
        assert rc == 2, out
        assert "in use by a running trainer" in out and f"pid {first.pid}" in out, out
        assert faultlib.no_traceback(out), out
        assert took < 30, f"the refused trainer took {took:.1f}s (after its imports) to give up"
    finally:
        first.kill_group()  # SIGKILL works on a stopped process; the kernel drops its flock
        first.finish()
    assert first.rc == -signal.SIGKILL
    rc, out = setup.train(workdir, prewarmed=third)
    assert rc == 0, out
    faultlib.assert_matches_reference(workdir, setup.reference)
