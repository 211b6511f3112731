"""``jaxckpt bench``: forwards to benchmarks/run.py (no benchmark runs here; each test takes well under a second)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import jaxckpt
from jaxckpt.cli import main

NAMES = ("step", "checkpoint", "train_save", "restart")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jaxckpt.cli", "bench", *args], capture_output=True, text=True,
                          timeout=60)


def test_list_names_the_four_benchmarks() -> None:
    p = bench("--list")
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines() if line and not line[0].isspace()]
    assert listed == list(NAMES)
    for name in NAMES:
        assert f"benchmarks/{name}.py" in p.stdout


def test_unknown_name_in_only_is_a_clear_error() -> None:
    p = bench("--only", "restart,nope")
    assert p.returncode == 2
    assert "unknown benchmark(s) 'nope'" in p.stderr
    assert "known: step, checkpoint, train_save, restart" in p.stderr
    assert "Traceback" not in p.stderr


def test_without_a_source_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(jaxckpt, "__file__", str(tmp_path / "site-packages" / "jaxckpt" / "__init__.py"))
    assert main(["bench", "--list"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/ ships with the source checkout; run from a git clone" in err
