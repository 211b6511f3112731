"""Test setup: 8 fake CPU devices, set before JAX is imported; collectives fail fast instead of hanging."""

import os

FAKE_DEVICES = 8
XLA_FLAGS = (
    f"--xla_force_host_platform_device_count={FAKE_DEVICES} "
    "--xla_cpu_collective_call_terminate_timeout_seconds=120"
)
os.environ["XLA_FLAGS"] = XLA_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# -- shared fixtures (imports below the environment set-up on purpose) -----------------------------
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A persistent compilation cache shared by the test modules (restored afterwards): compile each program once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield path
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The fault suites' shared dataset, reference run and pooled launchers (tests/faultlib.py)."""
    import faultlib

    yield faultlib.get_setup(tmp_path_factory.getbasetemp())
    faultlib.kill_all()  # idle pooled launchers stay for the next module; atexit (or EOF on stdin) ends them


@pytest.fixture
def no_stray_processes(setup) -> Iterator[None]:  # noqa: ANN001 - faultlib.Setup
    """Whatever a test did, no trainer it started may outlive it."""
    import faultlib

    yield
    faultlib.kill_all()
    strays = faultlib.stray_processes(str(setup.root))
    assert not strays, f"processes left behind: {strays}"
