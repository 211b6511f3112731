"""Exact resume end to end: interrupted runs are bit-identical to uninterrupted ones.

Also: resume onto another mesh / device count, ``train.resume`` modes, config changes on resume,
``train.init_from`` and falling back past corrupt checkpoints.

Cost control: one tiny model (with residual dropout, so the RNG path is always exercised), one tiny
dataset (an epoch is 5 steps), one mesh (data=4 x fsdp=2) and a persistent XLA compilation cache
shared by every in-process run and CLI subprocess, so each distinct program compiles once.
Same-device-count scenarios run ``trainer.train`` in process; subprocesses are used only for other
device counts, Grain worker processes and real exit codes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxckpt import cli
from jaxckpt import resume as resume_lib
from jaxckpt.checkpoint import load_params
from jaxckpt.config import Config, ConfigError, load_config
from jaxckpt.errors import ResumeError
from jaxckpt.mesh import make_mesh
from jaxckpt.metrics import MetricsWriter, read_metrics
from jaxckpt.optim import make_optimizer
from jaxckpt.resume import config_changes
from jaxckpt.state import ModelDef, abstract_state, init_params
from jaxckpt.trainer import train

N = 12  # steps of every full run
EPOCH_STEPS = 5  # (n_train - 1) // SEQ // BATCH for the dataset below
SEQ, BATCH = 32, 8
MESH = ["mesh.data=4", "mesh.fsdp=2"]
SUBPROCESS_TIMEOUT = 420


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, jit_cache: Path) -> Iterator[dict[str, str]]:
    """JAXCKPT_CACHE in a temp dir for this module; returns the base env for CLI subprocesses."""
    cache = tmp_path_factory.mktemp("jaxckpt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCKPT_CACHE", str(cache))
        base = dict(os.environ)
        base.update(JAXCKPT_CACHE=str(cache), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jit_cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        yield base


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """1500 bytes of seeded word salad: 1425 train tokens = 44 windows of 32 = 5.5 batches per epoch."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(1234)
    words = ["orbax", "grain", "flax", "mesh", "shard", "step", "resume", "exact", "bits", "the", "a", "of"]
    text = " ".join(rng.choice(words) + rng.choice(["", ",", ".", "\n"]) for _ in range(600))[:1500]
    (root / "corpus.txt").write_text(text)
    assert cli.main(["prepare", "--input", str(root / "corpus.txt"), "--out", str(root / "ds")]) == 0
    n_train = json.loads((root / "ds" / "meta.json").read_text())["n_train"]
    assert (n_train - 1) // SEQ // BATCH == EPOCH_STEPS
    return root / "ds"


def overrides(ds: Path, *extra: str) -> list[str]:
    """The tiny-run overrides every test shares, then ``extra``."""
    return [
        f"data.path={ds}", "model.d_model=32", "model.n_layers=1", f"model.seq_len={SEQ}",
        f"data.batch_size={BATCH}", f"train.steps={N}", "train.log_every=1", "train.eval_every=0",
        "train.progress=false", "train.tensorboard=false", "checkpoint.every_steps=4", *MESH,
        # Residual dropout on everywhere, so every exactness test also covers the per-step RNG.
        "model.dropout=0.1",
        # A fixed decay horizon keeps the step program independent of train.steps (one compile).
        f"optim.decay_steps={N}",
        # The module's own compilation cache (see jit_cache / cli_env) stays in charge.
        "train.compilation_cache=",
        *extra,
    ]


def make_cfg(ds: Path, *extra: str) -> Config:
    return load_config(None, overrides(ds, *extra))


def losses(workdir: Path) -> dict[int, float]:
    """Loss per logged step; for steps logged twice (re-run after a resume) the last row wins."""
    return {int(r["step"]): r["loss"] for r in read_metrics(workdir)}


def load_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's ``state`` as host numpy, keyed by its tree path (plain Orbax)."""
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    assert any(k.startswith("['params']") for k in a)
    different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    assert not different, f"arrays differ bitwise: {different}"


def steps_on_disk(workdir: Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def snapshot(workdir: Path) -> dict[str, int]:
    """Every file under ``workdir/checkpoints`` with its size."""
    root = Path(workdir) / "checkpoints"
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cli_cmd(workdir: Path, args: list[str], stop_at: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "jaxckpt.cli", "train", "--workdir", str(workdir)]
    return cmd + (["--stop-at-step", str(stop_at)] if stop_at is not None else []) + args


def cli_env(env: dict[str, str], devices: int) -> dict[str, str]:
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                                "--xla_cpu_collective_call_terminate_timeout_seconds=120"}


def run_parallel(jobs: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Run CLI commands concurrently (output to files, so no pipe can fill up); (returncode, stderr) each."""
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in jobs]
        procs = [subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, text=True)
                 for (cmd, e), log in zip(jobs, logs, strict=True)]
        try:
            for p in procs:
                p.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        out = []
        for p, log in zip(procs, logs, strict=True):
            log.seek(0)
            out.append((p.returncode, log.read()))
        return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """One uninterrupted run of N steps (checkpoints at 4, 8, 12)."""
    workdir = tmp_path_factory.mktemp("ref") / "run"
    result = train(make_cfg(dataset), workdir)
    assert result.step == N and not result.stopped_early
    assert sorted(losses(workdir)) == list(range(1, N + 1))
    return workdir


class Stopped:
    """Workdirs of runs interrupted with ``stop_at=K`` (made once per K, copied by tests)."""

    def __init__(self, root: Path, ds: Path):
        self.root, self.ds = root, ds
        self.dirs: dict[int, Path] = {}

    def get(self, k: int) -> Path:
        if k not in self.dirs:
            workdir = self.root / f"stop{k}"
            result = train(make_cfg(self.ds), workdir, stop_at=k)
            assert result.step == k and result.stopped_early
            assert k in steps_on_disk(workdir)
            self.dirs[k] = workdir
        return self.dirs[k]

    def copy(self, k: int, dst: Path) -> Path:
        return copy_workdir(self.get(k), dst)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, dataset: Path, reference: Path) -> Stopped:
    return Stopped(tmp_path_factory.mktemp("stopped"), dataset)


# -- bitwise exactness --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k",
    [
        3,  # mid epoch 0; the resumed part crosses both epoch boundaries (batch 5 straddles epochs)
        EPOCH_STEPS,  # checkpoint at the end of epoch 0, next batch straddles the boundary
        8,  # mid epoch 1, on a periodic checkpoint step
        11,  # exactly at a window-aligned epoch boundary (88 windows = 2 epochs of 44)
    ],
)
def test_interrupted_run_is_bitwise_identical(
    k: int, reference: Path, stopped: Stopped, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stop at K, re-run the same command: every loss and every final array equals the uninterrupted run."""
    workdir = stopped.copy(k, tmp_path / "run")
    ref = losses(reference)
    first = losses(workdir)
    assert sorted(first) == list(range(1, k + 1))
    assert all(first[s] == ref[s] for s in first)
    capsys.readouterr()
    result = train(make_cfg(stopped.ds), workdir)
    err = capsys.readouterr().err
    assert f"resumed from checkpoint {k}" in err
    assert result.step == N
    got = losses(workdir)
    mismatched = {s: (got.get(s), ref[s]) for s in range(k + 1, N + 1) if got.get(s) != ref[s]}
    assert not mismatched, f"losses after resuming at {k} differ: {mismatched}"
    assert_states_equal(load_state(workdir, N), load_state(reference, N))


def test_restart_takes_the_stored_train_step(reference: Path, dataset: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With a compilation cache, the first run stores its compiled step; the restart loads it on a thread
    (jaxckpt.aot.Prefetch), uses it without compiling, and still ends bit-identical."""
    from jaxckpt import aot, trainer

    cache = tmp_path / "cache"  # not through enable_compilation_cache: JAX's own cache stays the module's
    monkeypatch.setattr(trainer, "enable_compilation_cache", lambda setting: cache)
    taken: list[object] = []  # what each Prefetch.take returned
    stores: list[Path] = []  # every executable kept
    take, store = aot.Prefetch.take, aot._store

    def spy_take(self: aot.Prefetch, key: str) -> object:
        taken.append(take(self, key))
        return taken[-1]

    def spy_store(path: Path, key: str, compiled: object) -> None:
        stores.append(path)
        store(path, key, compiled)

    monkeypatch.setattr(aot.Prefetch, "take", spy_take)
    monkeypatch.setattr(aot, "_store", spy_store)
    workdir = tmp_path / "run"
    train(make_cfg(dataset), workdir, stop_at=6)
    assert taken == [None] and len(stores) == 1  # nothing stored yet: compiled, then stored
    train(make_cfg(dataset), workdir)
    assert len(taken) == 2 and taken[1] is not None and len(stores) == 1  # loaded, not compiled again
    ref = losses(reference)
    assert {s: v for s, v in losses(workdir).items() if s > 6} == {s: ref[s] for s in range(7, N + 1)}
    assert_states_equal(load_state(workdir, N), load_state(reference, N))


def test_train_pauses_cyclic_collection_until_its_first_step_has_run(dataset: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Building and restoring run with collection off (jaxckpt.gcpause.begin_start_up); the steps after the
    first run with it on and start-up's objects frozen; train() leaves the process as it found it, also when
    start-up fails."""
    seen: dict[str, object] = {}
    real_start, real_write = resume_lib.start_state, MetricsWriter.write

    def start_state(*args: object) -> object:
        seen["restore"] = gc.isenabled()
        return real_start(*args)

    def write(self: MetricsWriter, step: int, scalars: dict) -> None:
        seen.setdefault("steps", []).append((step, gc.isenabled(), gc.get_freeze_count()))
        real_write(self, step, scalars)

    monkeypatch.setattr(resume_lib, "start_state", start_state)
    monkeypatch.setattr(MetricsWriter, "write", write)
    gc.enable()
    before = gc.get_freeze_count()
    train(make_cfg(dataset, "train.steps=3", "checkpoint.every_steps=0"), tmp_path / "run")
    assert seen["restore"] is False
    assert [s[:2] for s in seen["steps"]] == [(1, True), (2, True), (3, True)]
    assert all(frozen > before for _, _, frozen in seen["steps"])
    assert gc.isenabled() and gc.get_freeze_count() == before  # the final save's thaw

    def fails(*args: object) -> object:
        raise ResumeError("no")

    monkeypatch.setattr(resume_lib, "start_state", fails)
    with pytest.raises(ResumeError):
        train(make_cfg(dataset), tmp_path / "failed")
    assert gc.isenabled() and gc.get_freeze_count() == before


def test_dropout_is_active(dataset: Path) -> None:
    """Every run here uses model.dropout=0.1, so the forward pass must really depend on the step key."""
    cfg = make_cfg(dataset)
    assert cfg.model.dropout > 0
    mdef = ModelDef.build(cfg.model)
    forward = jax.jit(lambda p, t, k: mdef.apply(p, t, jax.random.wrap_key_data(k)))
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(cfg.model, 0))
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
    tokens = jnp.arange(2 * SEQ, dtype=jnp.int32).reshape(2, SEQ) % 256
    keys = [jax.random.key_data(jax.random.key(i)) for i in (0, 0, 1)]
    a, b, c = (np.asarray(forward(params, tokens, k)) for k in keys)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c), "the dropout key has no effect"


def test_worker_processes_resume_is_bitwise_identical(
    reference: Path, dataset: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """data.worker_count=2 (Grain worker processes), CLI: stop at 5, re-run; bit-identical to uninterrupted."""
    args = overrides(dataset, "data.worker_count=2")
    e8 = cli_env(env, 8)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    (rc_a, err_a), (rc_b, err_b) = run_parallel([(cli_cmd(a_dir, args), e8), (cli_cmd(b_dir, args, 5), e8)])
    assert rc_a == 0, err_a[-3000:]
    assert rc_b == 0, err_b[-3000:]
    assert steps_on_disk(b_dir)[-1] == 5
    ((rc, err),) = run_parallel([(cli_cmd(b_dir, args), e8)])
    assert rc == 0, err[-3000:]
    assert "resumed from checkpoint 5" in err
    a, b = losses(a_dir), losses(b_dir)
    assert sorted(b) == list(range(1, N + 1))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    assert_states_equal(load_state(b_dir, N), load_state(a_dir, N))
    # Worker processes must not change which batches are drawn: same bits as the in-process pipeline.
    ref = losses(reference)
    assert all(a[s] == ref[s] for s in a), {s: (a[s], ref[s]) for s in a if a[s] != ref[s]}


# -- other topology -----------------------------------------------------------------------------


def test_resume_on_fewer_devices_and_other_mesh(
    reference: Path, stopped: Stopped, env: dict[str, str], tmp_path: Path
) -> None:
    """Saved on 8 devices (data=4 x fsdp=2), resumed on 4 devices as data=2 x fsdp=2 and data=4 x fsdp=1."""
    k = 5
    meshes = {"d2f2": ["mesh.data=2", "mesh.fsdp=2"], "d4f1": ["mesh.data=4", "mesh.fsdp=1"]}
    dirs = {name: stopped.copy(k, tmp_path / name) for name in meshes}
    e4 = cli_env(env, 4)
    jobs = [(cli_cmd(dirs[name], overrides(stopped.ds, *mesh)), e4) for name, mesh in meshes.items()]
    results = run_parallel(jobs)
    ref = losses(reference)
    for (name, mesh), (rc, err) in zip(meshes.items(), results, strict=True):
        assert rc == 0, f"{name}: {err[-3000:]}"
        assert f"resumed from checkpoint {k}" in err, name
        assert "4 x cpu device(s)" in err, name
        got = losses(dirs[name])
        assert sorted(got) == list(range(1, N + 1)), name
        after = np.array([got[s] for s in range(k + 1, N + 1)])
        want = np.array([ref[s] for s in range(k + 1, N + 1)])
        np.testing.assert_allclose(after, want, rtol=1e-5, atol=0, err_msg=f"{name} ({mesh}): data stream differs")
        assert steps_on_disk(dirs[name])[-1] == N


# -- train.resume modes -------------------------------------------------------------------------


def test_resume_never_refuses_existing_checkpoints(
    reference: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI exits 2 with a message saying what to do, and every checkpoint file stays in place."""
    workdir = copy_workdir(reference, tmp_path / "run")
    before = snapshot(workdir)
    capsys.readouterr()
    rc = cli.main(["train", "--workdir", str(workdir), *overrides(dataset, "train.resume=never")])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "train.resume=never" in err and "already holds checkpoints" in err
    assert "Traceback" not in err
    assert snapshot(workdir) == before


def test_resume_overwrite_starts_from_step_zero(
    reference: Path, stopped: Stopped, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train.resume=overwrite deletes the old checkpoints and trains from step 0."""
    workdir = stopped.copy(5, tmp_path / "run")
    old = steps_on_disk(workdir)
    assert old and old[-1] == 5
    capsys.readouterr()
    result = train(make_cfg(stopped.ds, "train.resume=overwrite"), workdir, stop_at=2)
    err = capsys.readouterr().err
    assert result.step == 2
    assert "resumed from" not in err
    assert "steps 0->" in err
    assert steps_on_disk(workdir) == [2]
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows[-2:]] == [1, 2]
    ref = losses(reference)
    assert [r["loss"] for r in rows[-2:]] == [ref[1], ref[2]]


# -- config changes on resume -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [("model.d_model=48", "model.d_model: 32 -> 48"), ("train.seed=7", "train.seed: 0 -> 7")],
)
def test_unsafe_config_change_refuses_to_resume(
    change: str, expected: str, stopped: Stopped, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 listing the difference; nothing in the workdir changes."""
    workdir = stopped.copy(5, tmp_path / "run")
    before = snapshot(workdir)
    capsys.readouterr()
    rc = cli.main(["train", "--workdir", str(workdir), *overrides(stopped.ds, change)])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert expected in err
    assert "resumed from" not in err
    assert snapshot(workdir) == before


def test_checkpoints_from_before_a_config_key_existed_still_resume(dataset: Path) -> None:
    """A saved config without a key added later (model.scan_layers, model.remat, model.attention) means that
    key's default."""
    cfg = make_cfg(dataset)
    saved = cfg.to_dict()
    for key in ("scan_layers", "remat", "attention"):
        del saved["model"][key]
    assert config_changes(saved, cfg) == ([], [])
    assert config_changes(saved, make_cfg(dataset, "model.d_ff=64"))[1] == ["model.d_ff: 192 -> 64"]


def test_safe_config_change_resumes(stopped: Stopped, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train.log_every and a larger train.steps may change: resume, say so, continue to the new end."""
    workdir = stopped.copy(5, tmp_path / "run")
    n_rows = len(read_metrics(workdir))
    capsys.readouterr()
    result = train(make_cfg(stopped.ds, "train.log_every=2", "train.steps=14"), workdir)
    err = capsys.readouterr().err
    assert "resumed from checkpoint 5" in err
    assert "train.log_every: 1 -> 2" in err and "train.steps: 12 -> 14" in err
    assert result.step == 14
    assert [r["step"] for r in read_metrics(workdir)[n_rows:]] == [6, 8, 10, 12, 14]
    assert steps_on_disk(workdir)[-1] == 14


def resume_changed(stopped: Stopped, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str,
                   logged: str) -> Path:
    """Resume the run stopped at 5 with one safe ``change`` to the end; the change is logged. The workdir."""
    workdir = stopped.copy(5, tmp_path / "run")
    capsys.readouterr()
    result = train(make_cfg(stopped.ds, change), workdir)
    err = capsys.readouterr().err
    assert "resumed from checkpoint 5" in err and logged in err
    assert result.step == N
    return workdir


def test_remat_is_a_safe_change_with_the_same_bits(stopped: Stopped, reference: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """model.remat changes what the backward pass keeps, not the state: resuming with it is allowed, and in
    float32 rematerialising whole blocks recomputes the very same values, so the losses match bit for bit."""
    workdir = resume_changed(stopped, tmp_path, capsys, "model.remat=block", "model.remat: 'none' -> 'block'")
    ref = losses(reference)
    assert {r["step"]: r["loss"] for r in read_metrics(workdir) if r["step"] > 5} == {
        s: ref[s] for s in range(6, N + 1)}


SCAN = ("model.scan_layers=true", "model.n_layers=2")


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """One uninterrupted run of N steps with model.scan_layers (2 stacked blocks)."""
    workdir = tmp_path_factory.mktemp("scanned") / "run"
    assert train(make_cfg(dataset, *SCAN), workdir).step == N
    return workdir


def test_scanned_layers_resume_bitwise(scanned: Path, dataset: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With model.scan_layers (stacked block params, one lax.scan), stop at 5 and re-run: the same bits."""
    run = tmp_path / "run"
    assert train(make_cfg(dataset, *SCAN), run, stop_at=5).stopped_early
    capsys.readouterr()
    assert train(make_cfg(dataset, *SCAN), run).step == N
    assert "resumed from checkpoint 5" in capsys.readouterr().err
    assert losses(run) == losses(scanned)
    state = load_state(run, N)
    assert state["['params']['blocks']['attn']['wq']"].shape[0] == 2  # really the stacked layout
    assert_states_equal(state, load_state(scanned, N))


def test_resume_converts_the_state_to_the_other_block_layout(stopped: Stopped, reference: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped unrolled, resumed with model.scan_layers: params and Adam moments are restacked (exactly:
    tests/test_scan_layers.py), then training goes on in the stacked layout, matching the unrolled reference
    up to float rounding (scanned and unrolled blocks order their sums differently)."""
    workdir = resume_changed(stopped, tmp_path, capsys, "model.scan_layers=true", "model.scan_layers: False -> True")
    got, ref = losses(workdir), losses(reference)
    np.testing.assert_allclose([got[s] for s in range(6, N + 1)], [ref[s] for s in range(6, N + 1)], rtol=1e-5)
    final = load_state(workdir, N)
    mu = [k for k in final if "['mu']['blocks']['attn']['wq']" in k]
    assert final["['params']['blocks']['attn']['wq']"].shape[0] == 1 and mu and final[mu[0]].shape[0] == 1


def test_export_of_a_scanned_run_names_each_layer(scanned: Path, tmp_path: Path) -> None:
    """Exports are layout-independent: blocks.0.*, blocks.1.*, each equal to its slice of the stacked array."""
    from jaxckpt.ckpt_tools import export

    export(scanned, N, tmp_path / "p.npz")
    exported, state = dict(np.load(tmp_path / "p.npz")), load_state(scanned, N)
    stacked = state["['params']['blocks']['mlp']['w_up']"]
    assert stacked.shape[0] == 2 and "blocks.mlp.w_up" not in exported
    for i in range(2):
        np.testing.assert_array_equal(exported[f"blocks.{i}.mlp.w_up"], stacked[i])
    assert len([k for k in exported if k.startswith("blocks.")]) == 2 * 9


# -- train.init_from ----------------------------------------------------------------------------


def test_init_from_takes_params_only(reference: Path, dataset: Path, tmp_path: Path) -> None:
    """Params equal the source checkpoint's bitwise; optimizer state, step and LR schedule start fresh."""
    workdir = tmp_path / "finetune"
    cfg = make_cfg(dataset, f"train.init_from={reference}")
    result = train(cfg, workdir, stop_at=0)
    assert result.step == 0
    assert steps_on_disk(workdir) == [0]
    src, dst = load_state(reference, N), load_state(workdir, 0)
    params = [k for k in src if k.startswith("['params']")]
    assert params and all(np.array_equal(src[k], dst[k]) for k in params)
    assert int(dst["['step']"]) == 0
    opt = {k: v for k, v in dst.items() if k.startswith("['opt_state']")}
    assert opt and all(not v.any() for v in opt.values()), "optimizer state is not fresh"
    assert any(src[k].any() for k in src if k.startswith("['opt_state']"))
    # One step on from there: a fresh schedule (lr 0 at step 0) and the trained params' lower loss.
    train(cfg, workdir, stop_at=1)
    row = read_metrics(workdir)[-1]
    ref = read_metrics(reference)
    assert row["step"] == 1 and row["lr"] == 0.0
    assert row["loss"] < ref[0]["loss"] - 0.3


def test_init_from_shape_mismatch_names_the_param(reference: Path, dataset: Path) -> None:
    """A different d_model: a ConfigError (CLI exit 2) naming the mismatched params and both shapes.

    Calls the loader the trainer uses for ``train.init_from`` with the d_model=48 model's abstract params
    (building that model's state would only add a compile).
    """
    cfg = make_cfg(dataset, "model.d_model=48", f"train.init_from={reference}")
    mdef = ModelDef.build(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    target = abstract_state(mdef, tx, make_mesh(cfg.mesh))["params"]
    with pytest.raises(ConfigError) as info:
        load_params(cfg.train.init_from, target)
    msg = str(info.value)
    assert "init_from" in msg
    lines = msg.splitlines()
    assert any("embed" in ln and "(256, 32)" in ln and "(256, 48)" in ln for ln in lines), msg
    assert not any("missing" in ln or "unexpected" in ln for ln in lines), f"spurious name mismatches: {msg}"


@pytest.mark.parametrize("into_scanned", [True, False])
def test_init_from_converts_between_block_layouts(into_scanned: bool, reference: Path, scanned: Path,
                                                  dataset: Path, tmp_path: Path) -> None:
    """Unrolled params into a scanned model and back: every block param lands in its layer, bit for bit."""
    src_dir, extra = (reference, SCAN[:1]) if into_scanned else (scanned, ("model.n_layers=2",))
    workdir = tmp_path / "finetune"
    assert train(make_cfg(dataset, *extra, f"train.init_from={src_dir}"), workdir, stop_at=0).step == 0
    src, dst = load_state(src_dir, N), load_state(workdir, 0)
    stacked, unrolled = (dst, src) if into_scanned else (src, dst)
    n_layers = 1 if into_scanned else 2
    block_keys = [k for k in stacked if k.startswith("['params']['blocks']")]
    assert len(block_keys) == 9
    for key in block_keys:
        layers = [unrolled[key.replace("['blocks']", f"['blocks']['{i}']")] for i in range(n_layers)]
        assert stacked[key].shape[0] == n_layers
        assert all(np.array_equal(stacked[key][i], layer) for i, layer in enumerate(layers)), key
    others = [k for k in src if k.startswith("['params']") and "['blocks']" not in k]
    assert others and all(np.array_equal(src[k], dst[k]) for k in others)


# -- corrupt checkpoints ------------------------------------------------------------------------


def _corrupt(step_dir: Path, how: str) -> None:
    if how == "state_deleted":
        shutil.rmtree(step_dir / "state")
    else:
        (step_dir / "meta" / "metadata").write_bytes(b"\x00garbage{not json" * 8)


@pytest.mark.parametrize("how", ["state_deleted", "meta_garbage"])
def test_corrupt_newest_checkpoint_falls_back_to_older(
    how: str, reference: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Newest (12) broken: resume from 8 with a log line, re-train 9..12 bit-identically, keep the bad bytes."""
    workdir = copy_workdir(reference, tmp_path / "run")
    assert steps_on_disk(workdir) == [4, 8, 12]
    _corrupt(workdir / "checkpoints" / "12", how)
    bad_meta = (workdir / "checkpoints" / "12" / "meta" / "metadata").read_bytes()
    capsys.readouterr()
    result = train(make_cfg(dataset), workdir)
    err = capsys.readouterr().err
    assert result.step == N
    assert "resumed from checkpoint 8" in err
    assert any("checkpoint 12" in line and "older" in line for line in err.splitlines()), err[-3000:]
    ref, got = losses(reference), losses(workdir)
    assert all(got[s] == ref[s] for s in range(9, N + 1)), {s: (got[s], ref[s]) for s in range(9, N + 1)}
    assert_states_equal(load_state(workdir, N), load_state(reference, N))
    # The bad checkpoint was not deleted: its bytes are still somewhere in the workdir (in place or moved).
    assert any(p.read_bytes() == bad_meta for p in workdir.rglob("metadata") if p.is_file()), \
        "the corrupt checkpoint was deleted"


def test_no_restorable_checkpoint_exits_nonzero_and_deletes_nothing(
    reference: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every checkpoint broken: a non-zero exit saying nothing was deleted, and every step dir still there."""
    workdir = copy_workdir(reference, tmp_path / "run")
    for step in steps_on_disk(workdir):
        _corrupt(workdir / "checkpoints" / str(step), "state_deleted" if step != 8 else "meta_garbage")
    before = snapshot(workdir)
    capsys.readouterr()
    rc = cli.main(["train", "--workdir", str(workdir), *overrides(dataset)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "nothing was deleted" in err
    assert "Traceback" not in err
    assert steps_on_disk(workdir) == [4, 8, 12]
    assert snapshot(workdir) == before

