"""The ``jaxckpt`` command line end to end, in subprocesses (as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from jaxckpt import ckpt_tools, malloc
from jaxckpt.cli import main
from jaxckpt.metrics import read_jsonl, read_metrics

# A tiny model: compiles and trains 20 steps in seconds on 2 cores. The schedule is pinned
# (optim.decay_steps) so runs with different train.steps compile the same step, and the runs that
# share a $JAXCKPT_CACHE reuse it from the persistent compilation cache.
TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
    "data.batch_size=8", "train.progress=false", "optim.lr=1e-2", "optim.warmup_steps=2", "optim.decay_steps=100",
]


@dataclass
class Proc:
    rc: int
    stdout: str
    stderr: str


def cli_env(root: Path) -> dict[str, str]:
    """The test process's env (8 fake devices from conftest) with a private cache dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXCKPT_", "SLURM_", "TPU_WORKER"))}
    env.update(XLA_FLAGS=os.environ["XLA_FLAGS"], JAX_PLATFORMS="cpu", JAXCKPT_CACHE=str(root / "cache"))
    return env


def jaxckpt(root: Path, *args: str, timeout: float = 240, env: dict[str, str] | None = None) -> Proc:
    """Run ``python -m jaxckpt.cli ARGS`` in ``root`` (killed and failed after ``timeout`` seconds), with
    ``env`` added to :func:`cli_env`."""
    p = subprocess.run([sys.executable, "-m", "jaxckpt.cli", *args], cwd=root, env={**cli_env(root), **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    return Proc(p.returncode, p.stdout, p.stderr)


def words_text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"], n_words)
    return " ".join(words) + "\n"


TRAIN_ARGS = ["data.path=data/ds", "train.steps=20", "train.log_every=5", "train.eval_every=10",
              "train.eval_batches=1", "checkpoint.every_steps=10", *TINY]


@dataclass
class Trained:
    root: Path
    data: Path
    workdir: Path
    prepare: Proc
    train: Proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """``jaxckpt prepare`` then ``jaxckpt train`` for 20 steps with eval and checkpoints."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(words_text(6000, seed=0))
    prep = jaxckpt(root, "prepare", "--input", "corpus.txt", "--out", "data/ds")
    assert prep.rc == 0, prep.stderr
    train = jaxckpt(root, "train", "--workdir", "run", *TRAIN_ARGS)
    return Trained(root, root / "data" / "ds", root / "run", prep, train)


def test_prepare(trained: Trained) -> None:
    assert "prepared data/ds:" in trained.prepare.stdout
    assert "train on it with: jaxckpt train data.path=data/ds" in trained.prepare.stdout
    assert sorted(p.name for p in trained.data.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_train_exits_cleanly(trained: Trained) -> None:
    t = trained.train
    assert t.rc == 0, t.stderr[-3000:]
    assert "Traceback" not in t.stderr
    assert "[jaxckpt] done: step 20" in t.stderr
    assert "8 x cpu device(s)" in t.stderr and "mesh data=8 x fsdp=1 x tensor=1" in t.stderr


def test_train_writes_metrics_and_loss_falls(trained: Trained) -> None:
    rows = read_metrics(trained.workdir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all({"loss", "grad_norm", "lr", "tokens_per_s"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20]
    losses = [r["loss"] for r in rows]
    assert losses[0] < 5.6  # ~ln(256) at the start, already falling by step 5
    assert losses[-1] < losses[0] - 0.5
    assert rows[-1]["eval_loss"] < rows[1]["eval_loss"]


def test_train_writes_tensorboard_events(trained: Trained) -> None:
    events = list((trained.workdir / "tensorboard").glob("events.out.tfevents*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_train_writes_checkpoints(trained: Trained) -> None:
    ckpts = trained.workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps == [10, 20]
    for s in steps:
        assert {"state", "data", "meta"} <= {p.name for p in (ckpts / str(s)).iterdir()}
    assert not [p for p in ckpts.iterdir() if "tmp" in p.name]


# `jaxckpt train` as the console script runs it (cli.run), with every cyclic collection's wall-clock time
# recorded (gc.callbacks) from the interpreter's first line; "began" marks the call. One JSON line at exit.
GC_PROBE = """
import gc, json, sys, time
seen = []
gc.callbacks.append(lambda phase, info: phase == "start" and seen.append(time.time()))
sys.argv = ["jaxckpt", *sys.argv[1:]]
from jaxckpt import cli
began = time.time()
try:
    cli.run()
finally:
    print("GC_PROBE " + json.dumps({"began": began, "collections": seen}), file=sys.stderr)
"""


def test_train_runs_its_start_up_without_cyclic_collections(trained: Trained) -> None:
    """From ``cli.run``'s call (before the heavy imports) to the end of the first step, ``jaxckpt train`` makes no
    cyclic collection (jaxckpt.gcpause.begin_start_up): on 2 cores those took 0.3 s of a 4.4-4.8 s warm restart.
    Collection is back on for the steps after it, where the final save sets some off."""
    p = subprocess.run([sys.executable, "-c", GC_PROBE, "train", "--workdir", "run_gc", *TRAIN_ARGS],
                       cwd=trained.root, env=cli_env(trained.root), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    probe = json.loads(p.stderr.split("GC_PROBE ")[-1])
    events = {e["event"]: e for e in read_jsonl(trained.root / "run_gc" / "events.jsonl")}
    first_step_done = events["first_step"]["time"]
    assert [t for t in probe["collections"] if probe["began"] <= t <= first_step_done] == []
    assert [t for t in probe["collections"] if t > first_step_done], "no collection after start-up: is gc on?"


def start_event(workdir: Path) -> dict:
    return next(e for e in read_jsonl(workdir / "events.jsonl") if e["event"] == "start")


@pytest.mark.skipif(malloc.find_tcmalloc() is None, reason=f"TCMalloc is not installed ({malloc.INSTALL})")
def test_train_runs_under_tcmalloc_and_trains_the_same_bits_as_under_glibc(trained: Trained) -> None:
    """The command starts itself again under TCMalloc (jaxckpt.malloc); JAXCKPT_MALLOC=system keeps glibc's
    malloc. The allocator changes where XLA's buffers live, never what the step computes."""
    assert start_event(trained.workdir)["allocator"] == "tcmalloc"
    assert "host allocator: TCMalloc (TCMALLOC_RELEASE_RATE=0)" in trained.train.stderr
    glibc = jaxckpt(trained.root, "train", "--workdir", "run_glibc", *TRAIN_ARGS, env={malloc.ENV: "system"})
    assert glibc.rc == 0, glibc.stderr[-3000:]
    assert start_event(trained.root / "run_glibc")["allocator"] == "system"
    assert f"host allocator: glibc malloc ({malloc.ENV}=system)" in glibc.stderr
    params = [np.load(export(workdir, 20, trained.root / f"{workdir.name}.npz"))
              for workdir in (trained.workdir, trained.root / "run_glibc")]
    assert sorted(params[0].files) == sorted(params[1].files) and params[0].files
    for name in params[0].files:
        a, b = params[0][name], params[1][name]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


def export(workdir: Path, step: int, out: Path) -> Path:
    ckpt_tools.export(workdir / "checkpoints", step, out)
    return out


def test_train_on_default_corpus(trained: Trained) -> None:
    """No data.path: the default corpus (stdlib sources) is built in $JAXCKPT_CACHE on first use."""
    root = trained.root
    p = jaxckpt(root, "train", "--workdir", "run_default", "train.steps=2", "train.log_every=1", "train.eval_every=0",
                "data.default_corpus_mb=0.1", "checkpoint.enabled=false", "train.tensorboard=false", *TINY)
    assert p.rc == 0, p.stderr[-3000:]
    assert "preparing the default corpus" in p.stdout + p.stderr
    corpora = list((root / "cache" / "jaxckpt").glob("stdlib-py*-0.1mb"))
    assert len(corpora) == 1 and (corpora[0] / "meta.json").is_file()
    assert [r["step"] for r in read_metrics(root / "run_default")] == [1, 2]
    assert not (root / "run_default" / "tensorboard").exists()


@dataclass
class Errors:
    root: Path
    runs: dict[str, Proc]


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> Errors:
    """The cheap failing invocations (each pays only the import time; running them concurrently
    was measured slower on 2 busy cores)."""
    root = tmp_path_factory.mktemp("cli_errors")
    cases = {
        "override": ["train", "--workdir", "run_override", "train.stpes=3"],
        "mesh": ["train", "--workdir", "run_mesh", "mesh.data=3", *TINY],
        "config": ["train", "--workdir", "run_config", "--config", "nope.py"],
    }
    runs = {name: jaxckpt(root, *args, timeout=120) for name, args in cases.items()}
    runs["malloc"] = jaxckpt(root, "train", "--workdir", "run_malloc", env={malloc.ENV: "jemalloc"}, timeout=120)
    return Errors(root, runs)


def assert_clean_error(p: Proc) -> None:
    """Exit status 2, one ``jaxckpt: error:`` line, no traceback."""
    assert p.rc == 2, p.stderr[-3000:]
    assert "jaxckpt: error:" in p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_override_suggests_fix(errors: Errors) -> None:
    p = errors.runs["override"]
    assert_clean_error(p)
    assert "unknown config key 'train.stpes'. Did you mean 'train.steps'?" in p.stderr
    assert not (errors.root / "run_override").exists()  # rejected before anything was created


def test_mesh_that_does_not_fit(errors: Errors) -> None:
    p = errors.runs["mesh"]
    assert_clean_error(p)
    assert "needs 3 devices but 8 are available" in p.stderr and "mesh.data=-1" in p.stderr


def test_missing_config_file(errors: Errors) -> None:
    p = errors.runs["config"]
    assert_clean_error(p)
    assert "config file 'nope.py' not found (try configs/tiny.py)" in p.stderr


def test_unknown_allocator_names_the_choices(errors: Errors) -> None:
    p = errors.runs["malloc"]
    assert_clean_error(p)
    assert "JAXCKPT_MALLOC='jemalloc' is not one of tcmalloc, system" in p.stderr
    assert not (errors.root / "run_malloc").exists()


def test_prepare_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process through ``main()`` (no training involved, so no subprocess needed)."""
    (tmp_path / "corpus.txt").write_text(words_text(500, seed=1))
    args = ["prepare", "--input", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "ds")]
    assert main(args) == 0
    before = (tmp_path / "ds" / "train.bin").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxckpt: error:") and "already holds a prepared dataset; pass --force" in err
    assert (tmp_path / "ds" / "train.bin").read_bytes() == before
    assert main([*args, "--force"]) == 0
