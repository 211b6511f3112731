"""``train.deterministic``: the XLA options that make a GPU train step reproducible reach the compile, and the
two scripts that check determinism on a machine (benchmarks/determinism.py, resume_bits.py) report correctly.

The GPU behaviour itself (a recompiled step differs without the options and not with them) was measured on
an H200: benchmarks/README.md §6. CI has no GPU, so these tests pin what a CPU can check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxckpt import step as step_lib
from jaxckpt.config import load_config
from jaxckpt.trainer import determinism_note, step_program
from tests.test_bench_cli import load_bench

TINY = ["model.d_model=32", "model.n_layers=1", "model.seq_len=16", "data.batch_size=8"]


@pytest.fixture
def keep_platforms() -> Iterator[None]:
    """The scripts' parents pin themselves to the CPU (``jax_platforms``); put it back for later tests."""
    old = jax.config.jax_platforms
    yield
    jax.config.update("jax_platforms", old)


def test_deterministic_options_are_for_gpus_only() -> None:
    """On CPUs the options are the same either way (tests/test_cpu_options.py), on TPUs there are none."""
    assert step_lib.compiler_options(True, "gpu") == {"xla_gpu_deterministic_ops": True}
    assert step_lib.compiler_options(True, "cuda") == {"xla_gpu_deterministic_ops": True}
    assert step_lib.compiler_options(False, "gpu") == {}
    assert step_lib.compiler_options(True, "cpu") == step_lib.compiler_options(False, "cpu")
    assert step_lib.compiler_options(True, "tpu") == step_lib.compiler_options(False, "tpu") == {}


def test_xla_knows_the_option() -> None:
    """The name is one XLA accepts (a typo or a flag a newer jaxlib dropped would fail every GPU compile);
    XLA:CPU knows the GPU flags too, and refuses a name it does not know."""
    f = lambda x: x * 2  # noqa: E731
    assert float(jax.jit(f, compiler_options=step_lib.GPU_DETERMINISTIC)(jnp.float32(1))) == 2.0
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(f, compiler_options={"xla_no_such_option": True})(jnp.float32(1))


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_train_step_compiles_with_the_options(monkeypatch: pytest.MonkeyPatch, deterministic: bool) -> None:
    """On a GPU the trainer's step carries the options into XLA: an option XLA refuses, put in their place,
    fails the compile exactly when ``train.deterministic`` is on."""
    monkeypatch.setattr(step_lib.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(step_lib, "GPU_DETERMINISTIC", {"xla_no_such_option": True})
    cfg = load_config(None, [*TINY, f"train.deterministic={str(deterministic).lower()}"])
    mesh, mdef, tx, step_fn = load_bench("mfu").build_step(cfg)
    state = load_bench("mfu").abstract_state(mdef, tx, mesh)
    batch = jax.ShapeDtypeStruct((8, 17), jnp.int32)
    if deterministic:
        with pytest.raises(Exception, match="No such compile option"):
            step_fn.lower(state, batch).compile()
    else:
        step_fn.lower(state, batch).compile()


def test_the_trainer_says_what_the_setting_does_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    on, off = (load_config(None, [f"train.deterministic={v}"]) for v in ("true", "false"))
    assert determinism_note(on) is None and determinism_note(off) is None  # a CPU: nothing to say
    monkeypatch.setattr(step_lib.jax, "default_backend", lambda: "gpu")
    assert "continues bit for bit" in determinism_note(on) and "is faster" in determinism_note(on)
    assert determinism_note(off).startswith("train.deterministic=false: autotuned GPU kernels")


def test_the_setting_is_part_of_the_stored_steps_key() -> None:
    """A step compiled without the options is never taken for one compiled with them (jaxckpt.aot)."""
    on, off = (load_config(None, [f"train.deterministic={v}"]) for v in ("true", "false"))
    assert step_program(on) != step_program(off)
    assert on.train.deterministic  # on by default


def test_determinism_script_reports_same_and_the_first_difference(capsys: pytest.CaptureFixture[str],
                                                                  keep_platforms: None) -> None:
    det = load_bench("determinism")
    run = {"losses": ["0x1p+1", "0x1p+0"], "state": "ab"}
    assert det.first_difference(run, dict(run)) == "same"
    assert det.first_difference(run, {**run, "losses": ["0x1p+1", "0x1.8p+0"]}) == "step 2"
    assert det.first_difference(run, {**run, "state": "cd"}) == "state"
    assert det.main(["--config", "configs/tiny.py", "--steps", "2", "--repeats", "1", "--modes", "off,deterministic",
                     *TINY]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| off ", "| deterministic "))]
    assert len(rows) == 2 and all(r.endswith("| same, same | same |") for r in rows), rows


def test_resume_bits_script_passes_here_and_sees_a_changed_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 keep_platforms: None) -> None:
    rb = load_bench("resume_bits")
    assert rb.main(["--config", "configs/tiny.py", "--steps", "4", "--stop-at", "2", "--deterministic", "true",
                    "--keep", str(tmp_path), *TINY, "model.dropout=0.1"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| true |"))
    assert "| 3 of 3 equal | " in row and row.endswith("| **PASS** |"), row  # losses at 3, 4 and eval at 4
    ref, resumed = tmp_path / "true" / "ref", tmp_path / "true" / "resumed"
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["loss"] = rows[-1]["loss"] + 1e-6
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses, state = rb.compare(ref, resumed, 2)
    assert losses.startswith("1 of 3 differ (first: step 4 loss") and "arrays equal" in state
