"""XLA:CPU's YNNPACK dot fusions (``jaxckpt.step.CPU_YNN_FUSIONS``): this XLA accepts them, they change the
compiled program, the trainer's steps get them, and an XLA that refuses them (or XLA_FLAGS that choose
YNN fusions) gets XLA's own default instead of a failed compile. The speed-up is measured, not tested
(benchmarks/README.md §4)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import pytest

from jaxckpt import step as step_lib
from jaxckpt.config import load_config
from tests.test_bench_cli import load_bench
from tests.test_determinism import TINY


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """``cpu_options`` decides once per process; let a test decide again, and the suite after it."""
    step_lib.cpu_options.cache_clear()
    yield
    step_lib.cpu_options.cache_clear()


def loop_fusions(options: dict[str, str] | None) -> int:
    """Loop fusions XLA:CPU makes of tanh(a @ b) * 2 + 1 besides the matmul's own call."""
    a = jnp.ones((64, 64), jnp.float32)
    text = jax.jit(lambda a, b: jnp.tanh(a @ b) * 2 + 1, compiler_options=options).lower(a, a).compile().as_text()
    assert "__ynn_fusion" in text
    return len(re.findall(r"kind=kLoop", text))


def test_this_xla_takes_them_and_fuses_the_elementwise_work_into_the_matmul() -> None:
    assert step_lib.compiler_options(True, "cpu") == step_lib.CPU_YNN_FUSIONS
    assert loop_fusions(None) == 1  # XLA's default: the matmul alone, then a loop for the rest
    assert loop_fusions(step_lib.CPU_YNN_FUSIONS) == 0


def test_the_trainers_step_is_compiled_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``cpu_options`` gives reaches the step's compile: an option XLA refuses in their place fails it."""
    monkeypatch.setattr(step_lib, "cpu_options", lambda: {"xla_no_such_option": "x"})
    cfg = load_config(None, TINY)
    mesh, mdef, tx, step_fn = load_bench("mfu").build_step(cfg)
    state = load_bench("mfu").abstract_state(mdef, tx, mesh)
    with pytest.raises(Exception, match="No such compile option"):
        step_fn.lower(state, jax.ShapeDtypeStruct((8, 17), jnp.int32)).compile()


def test_an_xla_that_refuses_them_gets_its_default(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    monkeypatch.setattr(step_lib, "CPU_YNN_FUSIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"})
    assert step_lib.cpu_options() == {}
    assert step_lib.compiler_options(True, "cpu") == {}


def test_xla_flags_that_choose_ynn_fusions_win(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=")
    assert step_lib.cpu_options() == {}
