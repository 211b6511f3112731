"""Run ``jaxckpt train`` as a subprocess and interrupt it: for notebooks, demos and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxckpt.metrics import read_metrics


def train_process(workdir: Path, overrides: list[str], config: str | None = None,
                  extra_env: dict[str, str] | None = None, log_file: Path | None = None) -> subprocess.Popen:
    """Start ``jaxckpt train`` in the background; its output goes to ``log_file`` (default WORKDIR.log)."""
    cmd = [sys.executable, "-m", "jaxckpt.cli", "train", "--workdir", str(workdir)]
    cmd += ["--config", config] if config else []
    log_path = Path(log_file or f"{workdir}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")
    env = {**os.environ, **(extra_env or {})}
    return subprocess.Popen([*cmd, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env)


def last_step(workdir: Path) -> int:
    rows = read_metrics(workdir)
    return max((int(r["step"]) for r in rows), default=0)


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout_s: float = 600) -> int:
    """Wait until the run logged ``step`` (or exited); returns the last logged step."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and last_step(workdir) < step:
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"run in {workdir} did not reach step {step} in {timeout_s:.0f}s")
        time.sleep(0.2)
    return last_step(workdir)


def preempt(proc: subprocess.Popen, timeout_s: float = 300) -> int:
    """Send SIGTERM (a preemption notice) and wait; returns the exit status (143 = saved and stopped)."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout_s)


def train(workdir: Path, overrides: list[str], config: str | None = None, timeout_s: float = 1800,
          extra_env: dict[str, str] | None = None) -> int:
    """Run ``jaxckpt train`` to completion (or until it stops); returns the exit status."""
    return train_process(workdir, overrides, config, extra_env).wait(timeout=timeout_s)


def loss_by_step(workdir: Path) -> dict[int, float]:
    """The last logged loss per step (a resumed run re-logs the steps after its checkpoint)."""
    return {int(r["step"]): r["loss"] for r in read_metrics(workdir) if "loss" in r}
