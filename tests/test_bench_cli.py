"""``jaxckpt bench`` forwards to benchmarks/run.py; benchmarks/mfu.py counts FLOPs the way XLA does."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxckpt
from jaxckpt.cli import main
from tests.test_malloc import GLIBC, NEEDS_TCMALLOC, tcmalloc_env

NAMES = ("step", "checkpoint", "train_save", "restart", "mfu")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jaxckpt.cli", "bench", *args], capture_output=True, text=True,
                          timeout=60)


def test_list_names_every_benchmark() -> None:
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
    assert "known: step, checkpoint, train_save, restart, mfu" in p.stderr
    assert "Traceback" not in p.stderr


def test_without_a_source_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(jaxckpt, "__file__", str(tmp_path / "site-packages" / "jaxckpt" / "__init__.py"))
    assert main(["bench", "--list"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/ ships with the source checkout; run from a git clone" in err


REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_median_trial_reports_the_middle_run_and_all_of_them() -> None:
    """The warm-restore protocol: every trial runs, the median one is reported whole, and all are listed."""
    benchlib = load_bench("benchlib")
    seconds = iter([0.9, 0.2, 0.4])
    runs = []

    def run() -> dict:
        runs.append(len(runs))
        return {"s": next(seconds), "run": runs[-1]}

    got = benchlib.median_trial(run, trials=3)
    assert got == {"s": 0.4, "run": 2, "trials_s": [0.9, 0.2, 0.4]}
    assert benchlib.median_trial(iter([{"s": 0.3}, {"s": 0.1}]).__next__, trials=2)["s"] == 0.1  # the lower


SETTLE = """
import sys
sys.path.insert(0, sys.argv[1])
import benchlib

benchlib.SETTLE_S = 0.0
before = benchlib.proc_status_mb("VmRSS")
benchlib.settle_memory(160 << 20)  # touches 400 MB (BACKED_FACTOR 2.5) and frees it
grew = benchlib.proc_status_mb("VmRSS") - before
print(benchlib.release_allocator_memory(), int(grew))
"""


@NEEDS_TCMALLOC
def test_settle_memory_hands_what_it_touched_back_to_the_kernel_under_tcmalloc_too() -> None:
    """The next writer's page cache comes from the kernel's free lists; TCMalloc keeps freed memory in the
    process until told to release it, and then settle_memory would settle nothing."""
    for env, allocator in ((tcmalloc_env(), "True"), (os.environ | GLIBC, "False")):
        out = subprocess.run([sys.executable, "-c", SETTLE, str(REPO / "benchmarks")], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[0] == allocator, out
        assert int(out[1]) < 100, out  # MB still resident of the 400 touched


def test_checkpoint_report_pairs_each_writer_with_the_dd_run_of_its_repetition() -> None:
    """×dd per repetition divides dd's time of repetition i by the writer's of repetition i, skipping failed runs."""
    ckpt = load_bench("checkpoint")
    results = {"dd": [{"write_s": 0.5}, {"write_s": 0.6}, {"write_s": 0.4}],
               "numpy": [],
               "jaxckpt": [{"durable_s": 0.625}, {"durable_s": 0.5}, {"durable_s": 0.8}],
               "torch": [{"durable_s": 1.0}, {"error": "rc 1"}, {"durable_s": 0.5}]}
    assert ckpt.durable_pairs_note(results) == [
        "durable ×dd per repetition (dd i / writer i): jaxckpt 0.80 1.20 0.50; torch 0.50 0.80"]
    assert ckpt.durable_pairs_note({"dd": [{"write_s": 0.5}], "numpy": []}) == []


@pytest.mark.parametrize("tied", [True, False])
def test_mfu_counts_every_matmul_weight(tied: bool) -> None:
    """6·N uses the params minus norms (and minus the lookup-only embedding when untied)."""
    import jax

    from jaxckpt.config import load_config
    from jaxckpt.model import param_count
    from jaxckpt.state import ModelDef

    mfu = load_bench("mfu")
    cfg = load_config(None, [f"model.tie_embeddings={str(tied).lower()}", "model.n_layers=3"]).model
    n_params = param_count(jax.tree.leaves(ModelDef.build(cfg).template))
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    lookup = 0 if tied else cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.seq_len * cfg.d_model
    assert mfu.model_flops_per_token(cfg) == 6 * (n_params - norms - lookup) + attention


def test_mfu_model_flops_agree_with_xla_on_cpu(tmp_path: Path) -> None:
    """On the CPU, where XLA counts every dot, its FLOPs per step are the model's plus a few % elementwise."""
    out = tmp_path / "mfu.json"
    p = subprocess.run([sys.executable, "benchmarks/mfu.py", "--configs", "configs/tiny.py", "--steps", "2",
                        "--repeats", "1", "--peak-tflops", "1", "--matmul", "256", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| tiny |" in p.stdout and "MFU vs datasheet" in p.stdout
    r = json.loads(out.read_text())["results"]["configs/tiny.py"]
    assert r["tokens_per_step"] == 8 * r["n_devices"] * 64  # DEFAULT_BATCH's 8 sequences per device x seq_len
    assert 1.0 <= r["xla_flops_per_device"] * r["n_devices"] / r["model_flops_per_step"] < 1.15
    assert r["step_s"] > 0 and r["loss"] > 0


def test_mfu_compile_only_reports_the_plan_without_running(tmp_path: Path) -> None:
    """--compile-only compiles against abstract state: a row with the settings, compile time and XLA's plan."""
    out = tmp_path / "compile.json"
    p = subprocess.run([sys.executable, "benchmarks/mfu.py", "--configs", "configs/tiny.py", "--compile-only",
                        "--json", str(out), "model.scan_layers=true", "model.remat=block"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| tiny | 2 | block | True |" in p.stdout and "MFU" not in p.stdout
    r = json.loads(out.read_text())["results"]["configs/tiny.py"]
    assert r["compile_s"] > 0 and r["argument_bytes"] > 0 and r["temp_bytes"] > 0
    assert r["plan_bytes"] >= r["temp_bytes"]


def test_checkpoint_phases_time_every_part_of_a_restore(tmp_path: Path) -> None:
    """``checkpoint.py --phases N`` restores N times and splits each restore's wall time into fastread's phases."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "checkpoint.py"), "--gb", "0.01", "--devices", "2",
                          "--phases", "2", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ") and "s |" not in line]
    assert [r[0].strip() for r in rows] == ["1", "2"]
    for row in rows:
        total, *phases, other = (float(x) for x in row[1:])
        assert all(p >= 0 for p in phases) and phases[2] > 0  # the read took time
        assert abs(total - sum(phases) - other) < 2e-3  # the columns add up (each printed to 1 ms)
    assert list(tmp_path.iterdir()) == []  # the scratch checkpoint is gone


def test_checkpoint_saves_times_the_later_saves_of_one_process(tmp_path: Path) -> None:
    """``--saves 3``: the save worker times two more saves after the first and leaves only the first on disk."""
    d = tmp_path / "ckpt"
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "checkpoint.py"), "--worker", "save",
                          "--dir", str(d), "--gb", "0.01", "--devices", "2", "--variant", "jaxckpt", "--saves", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(row["later_blocking_s"]) == 2 and all(0 < t < 60 for t in row["later_blocking_s"])
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["1"]


def test_train_save_control_writes_every_byte_of_the_state_in_paced_windows(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain write beside training (train_save's control) writes the state's bytes in order, of every dtype
    and shape, in windows of at most the pacer's burst, from a thread it lowers to the save's nice value and
    scheduling class."""
    import threading
    import types

    import ml_dtypes
    import numpy as np

    ts = load_bench("train_save")
    arrays = [np.arange(1000, dtype=np.float32).reshape(10, 100), np.array(7, dtype=np.int32),
              np.linspace(0, 1, 333).astype(ml_dtypes.bfloat16)]
    pacer = types.SimpleNamespace(burst=1000.0, period=0.001)
    writes: list[int] = []
    real_write = ts.os.write

    def counted(fd: int, data) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    path, priority = tmp_path / "plain.bin", []
    monkeypatch.setattr(ts.os, "write", counted)
    t = threading.Thread(target=lambda: (ts.plain_write(arrays, path, pacer, 19, True), priority.append(
        (ts.os.getpriority(ts.os.PRIO_PROCESS, 0), ts.os.sched_getscheduler(0)))))
    t.start()
    t.join()
    assert path.read_bytes() == b"".join(a.tobytes() for a in arrays)
    assert max(writes) <= 1000 and sum(writes) == 4000 + 4 + 666
    assert len(writes) >= 5  # 4,670 bytes cannot fit fewer 1,000-byte windows
    assert priority == [(19, ts.os.SCHED_IDLE)]


def train_save_steps(ts, *walls: float) -> list:
    """``ts``'s (train_save's) ``Step``s of these wall times, with CPU twice the wall."""
    return [ts.Step(w, 2 * w) for w in walls]


def test_train_save_counts_steps_over_the_target_beside_a_save_a_plain_write_and_none() -> None:
    ts = load_bench("train_save")
    steps = functools.partial(train_save_steps, ts)

    normals = [ts.Normal(steps(1.0, 1.0, 1.3)), ts.Normal(steps(1.0, 0.9))]
    save = ts.SaveWindow(5, 0.01, 0.01, steps(1.25, 1.1, 1.21), 3.0, 2.5, 2.9)
    m = ts.Measured(1.0, save, normals, [save], [ts.Normal(steps(1.1, 1.3))])
    sm = ts.summarize(m, every=100)
    assert (sm["over_slow"], sm["n_over"], sm["plain_slow"], sm["n_plain"], sm["normal_slow"]) == (2, 3, 1, 2, 1)
    rows = ts.control_rows(sm)
    assert "1.20× / 1.30×" in rows[0]
    assert "| 2 of 3 (67%) / 1 of 2 (50%) / 1 of 5 (20%) (normal max 1.30×)" in rows[1]
    assert len(ts.control_rows({**sm, "n_plain": 0})) == 1  # --no-plain: no plain-write row


def test_train_save_typical_max_is_the_slowest_of_k_steps_in_the_median_draw() -> None:
    """P(the slowest of k drawn is among the j fastest) = C(j, k) / C(n, k); the first j where that reaches 1/2."""
    ts = load_bench("train_save")
    walls = [4.0, 1.0, 3.0, 2.0]
    assert [ts.typical_max(walls, k) for k in (1, 2, 3, 4)] == [2.0, 3.0, 4.0, 4.0]  # C(j,3)/4 >= 1/2 first at j=4
    assert ts.typical_max(walls, 9) == 4.0  # more overlapped steps than normal ones: all of them


def test_train_save_judges_the_slowest_place_and_the_slowest_step_against_the_machines_own() -> None:
    """A save window's first step 1.25x on average fails, though no step is slower than the slowest normal one;
    a lone 1.3x step among normal ones over 1.2x passes, and one that outruns them by more than 1.2x fails."""
    ts = load_bench("train_save")
    steps = functools.partial(train_save_steps, ts)

    def rows(normal: list, *saves: list) -> list[str]:
        windows = [ts.SaveWindow(5, 0.01, 0.01, steps(*s), 3.0, 2.5, 2.9) for s in saves]
        m = ts.Measured(1.0, windows[0], [ts.Normal(steps(*normal))], windows, [])
        return ts.slowest_rows(ts.summarize(m, every=100))

    noisy = [1.0] * 8 + [1.3, 1.35]
    first_slow = rows(noisy, [1.2, 1.0, 1.0], [1.3, 1.0, 1.0])
    assert "(1st step, 2 of them), mean ÷ T0 | 1.25× | ≤ 1.2× | FAIL |" in first_slow[0]
    assert "÷ the slowest of 6 normal steps (median draw of 6 of 10) | 0.96× (1.30× ÷ 1.35× T0)" in first_slow[1]
    assert first_slow[1].endswith("| PASS |")
    assert "normal steps reached 1.35× T0) | 1.30× | - | |" in first_slow[2]
    lone = rows(noisy, [1.0, 1.3, 1.0], [1.0, 1.0, 1.0])
    assert lone[0].endswith("| PASS |") and lone[1].endswith("| PASS |")
    outrun = rows([1.0] * 10, [1.0, 1.3, 1.0], [1.0, 1.0, 1.0])
    assert "3rd and later" not in outrun[0] and "(2nd step, 2 of them), mean ÷ T0 | 1.15×" in outrun[0]
    assert "| 1.30× (1.30× ÷ 1.00× T0) | ≤ 1.2× | FAIL |" in outrun[1]
    fewer = rows([1.0, 1.1], [1.0, 1.3, 1.0])  # more steps beside the saves than normal ones: all of those
    assert "÷ the slowest of all 2 normal steps | 1.18× (1.24× ÷ 1.05× T0)" in fewer[1]  # T0 1.05
    assert ts.slowest_rows(ts.summarize(ts.Measured(1.0, ts.SaveWindow(5, 0, 0, [], 1, 1, 1), [ts.Normal(steps(1.0))],
                                                    [ts.SaveWindow(5, 0, 0, [], 1, 1, 1)], []), 100)) == \
        ["| slowest overlapped step | no steps overlapped a save | - | |"]
