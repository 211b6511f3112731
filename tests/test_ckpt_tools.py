"""``jaxckpt ckpt list|inspect|export`` on one shared, really trained workdir."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxckpt import cli
from jaxckpt.config import load_config
from jaxckpt.trainer import train

N = 12
SEQ, BATCH = 32, 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, jit_cache: Path) -> Iterator[Path]:
    """12 steps, a checkpoint every 2, keep the latest 2, every 4th and the best 1 by training loss."""
    root = tmp_path_factory.mktemp("ckpt-tools")
    rng = random.Random(99)
    words = ["list", "inspect", "export", "params", "shape", "dtype", "the", "a"]
    (root / "corpus.txt").write_text(" ".join(rng.choice(words) for _ in range(400))[:1500])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCKPT_CACHE", str(root / "cache"))
        assert cli.main(["prepare", "--input", str(root / "corpus.txt"), "--out", str(root / "ds")]) == 0
        # Same model, mesh and schedule as tests/test_resume.py, so the compiled programs are shared.
        cfg = load_config(None, [
            f"data.path={root / 'ds'}", "model.d_model=32", "model.n_layers=1", f"model.seq_len={SEQ}",
            f"data.batch_size={BATCH}", f"train.steps={N}", "train.log_every=1", "train.eval_every=0",
            "train.progress=false", "train.tensorboard=false", "mesh.data=4", "mesh.fsdp=2",
            "model.dropout=0.1", f"optim.decay_steps={N}", "train.compilation_cache=",
            "checkpoint.every_steps=2", "checkpoint.keep_latest=2", "checkpoint.keep_every=4",
            "checkpoint.keep_best=1", "checkpoint.best_metric=loss",
        ])
        train(cfg, root / "run")
        yield root / "run"


def steps_on_disk(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def meta(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def checkpoint_params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The checkpoint's params as numpy, keyed by dotted path (``blocks.0.attn.wq``), read with plain Orbax."""
    path = workdir / "checkpoints" / str(step) / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v) for path, v in flat}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- list ---------------------------------------------------------------------------------------


def test_retention_left_the_expected_steps(workdir: Path) -> None:
    steps = steps_on_disk(workdir)
    assert {4, 8, 10, 12} <= set(steps)
    assert set(steps) - {4, 8, 10, 12} <= set(range(2, 12, 2))  # at most the best-by-loss step on top
    assert len(steps) <= 5


def test_list_shows_steps_sizes_and_reasons(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``jaxckpt ckpt list W``: one row per step with a size in MB and why the step is kept."""
    rc, out, err = run_cli(["ckpt", "list", str(workdir)], capsys)
    assert rc == 0, err[-3000:]
    lines = out.strip().splitlines()
    header, rows = lines[0], lines[1:]
    assert "step" in header and "size" in header and "kept because" in header
    by_step = {int(r.split()[0]): r for r in rows}
    steps = steps_on_disk(workdir)
    assert sorted(by_step) == steps
    for s, row in by_step.items():
        sizes = [float(x) for x in re.findall(r"\s(\d+\.\d\d)\s", row)]
        assert sizes and sizes[0] > 0, row
        assert row.rstrip()[-1] != "-", f"step {s} listed without a reason to keep it: {row}"
    assert "every 4" in by_step[4] and "every 4" in by_step[8]
    assert "latest 2" in by_step[10] and "latest 2" in by_step[12] and "every 4" in by_step[12]
    assert "latest" not in by_step[4] and "latest" not in by_step[8]
    best = min(steps, key=lambda s: meta(workdir, s)["metrics"]["loss"])
    assert "best 1 by loss" in by_step[best]
    assert sum("best" in r for r in rows) == 1


def test_list_in_process_matches_and_accepts_checkpoints_dir(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out_a, _ = run_cli(["ckpt", "list", str(workdir)], capsys)
    rc_b, out_b, _ = run_cli(["ckpt", "list", str(workdir / "checkpoints")], capsys)
    assert rc == rc_b == 0
    assert out_a == out_b


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_params_shapes_dtypes_and_config(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(["ckpt", "inspect", str(workdir), "--step", "8"], capsys)
    assert rc == 0, err
    assert str(workdir / "checkpoints" / "8") in out
    expected = {
        "['params']['embed']": "(256, 32)",
        "['params']['blocks']['0']['attn']['wq']": "(32, 4, 8)",
        "['params']['blocks']['0']['mlp']['w_down']": "(192, 32)",
        "['params']['final_norm']['scale']": "(32,)",
    }
    lines = out.splitlines()
    for name, shape in expected.items():
        line = next((ln for ln in lines if name in ln), None)
        assert line is not None, f"{name} not listed"
        assert shape in line and "float32" in line, line
    assert any("['step']" in ln and "int32" in ln for ln in lines)
    config = json.loads(out.split("config:\n", 1)[1])
    assert config["model"]["d_model"] == 32 and config["train"]["steps"] == N
    assert config == meta(workdir, 8)["config"]


def test_inspect_missing_step_is_a_clear_error(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["ckpt", "inspect", str(workdir), "--step", "7"], capsys)
    assert rc == 2
    assert "7" in err and "available" in err and "Traceback" not in err


# -- export -------------------------------------------------------------------------------------

LOAD_WITHOUT_JAX = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    from safetensors.numpy import load_file
    st, npz = load_file(sys.argv[1]), dict(np.load(sys.argv[2]))
    assert "jax" not in sys.modules, "loading an export imported jax"
    digest = lambda d: {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.tobytes()).hexdigest()] for k, v in d.items()}
    print(json.dumps([digest(st), digest(npz)]))
""")


@pytest.fixture(scope="module")
def exports(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str]]:
    """Step 8 exported through the CLI (in process): suffix -> (file, exit code, stderr)."""
    out = tmp_path_factory.mktemp("export")
    results = {}
    for suffix in (".safetensors", ".npz"):
        path, err = out / f"params{suffix}", io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(["ckpt", "export", str(workdir), "--step", "8", "--out", str(path)])
        results[suffix] = (path, rc, err.getvalue())
    return results


def exported(exports: dict[str, tuple[Path, int, str]], suffix: str) -> Path:
    path, rc, err = exports[suffix]
    assert rc == 0, f"jaxckpt ckpt export --out {path.name} failed:\n{err[-3000:]}"
    assert path.is_file()
    return path


def test_export_safetensors_equals_checkpoint_params(workdir: Path, exports: dict[str, tuple[Path, int, str]]) -> None:
    from safetensors.numpy import load_file

    st = exported(exports, ".safetensors")
    got, want = load_file(str(st)), checkpoint_params(workdir, 8)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k


def test_export_npz_equals_checkpoint_params(workdir: Path, exports: dict[str, tuple[Path, int, str]]) -> None:
    npz = exported(exports, ".npz")
    with np.load(npz) as f:
        got = {k: f[k] for k in f.files}
    want = checkpoint_params(workdir, 8)
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


def test_exports_load_without_jax(workdir: Path, exports: dict[str, tuple[Path, int, str]]) -> None:
    """A plain numpy + safetensors process (no JAX imported) reads both files to the same bytes."""
    st, npz = exported(exports, ".safetensors"), exported(exports, ".npz")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_JAX, str(st), str(npz)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_st, from_npz = json.loads(proc.stdout)
    assert from_st == from_npz
    assert set(from_st) == set(checkpoint_params(workdir, 8))


def test_export_rejects_unknown_suffix(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["ckpt", "export", str(workdir), "--step", "8", "--out", str(tmp_path / "p.pt")], capsys)
    assert rc == 2
    assert ".safetensors" in err and ".npz" in err


# -- relative paths and sampling ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["ckpt", "inspect", "run"], ["ckpt", "export", "run", "--out", "rel.npz"],
                                  ["sample", "run", "--prompt", "the", "--tokens", "4"]])
def test_commands_take_a_relative_workdir(args: list[str], workdir: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Orbax refuses relative checkpoint paths; the CLI resolves them first (this was a crash)."""
    monkeypatch.chdir(workdir.parent)
    rc, out, err = run_cli(args, capsys)
    assert rc == 0, err
    assert "Traceback" not in err and out.strip()


def test_sample_is_seeded_and_greedy_ignores_the_seed(workdir: Path) -> None:
    """Same seed, same text; temperature 0 is argmax, so the seed does not matter; seeds differ otherwise."""
    from jaxckpt.sample import sample

    spec = f"{workdir}:{N}"
    a, b, c = (sample(spec, "the ", 12, 1.0, seed) for seed in (0, 0, 1))
    assert a.startswith("the ") and len(a) > len("the ")
    assert a == b and a != c
    assert sample(spec, "the ", 12, 0.0, 0) == sample(spec, "the ", 12, 0.0, 5)
