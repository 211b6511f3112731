"""jaxckpt.aot: a stored executable is reused only for the same program, gives the same bits, and a bad
file costs a compile, never a wrong result."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxckpt import aot

TRACES: list[int] = []


def make_step() -> jax.stages.Wrapped:
    """A fresh jitted, donating step (a new function object each time, as in a new process)."""

    def step(state: dict, x: jax.Array) -> tuple[dict, jax.Array]:
        TRACES.append(1)
        w = state["w"] - 0.1 * jnp.tanh(state["w"] @ x)
        return {"w": w, "n": state["n"] + 1}, jnp.sum(w)

    return jax.jit(step, donate_argnums=0)


def args() -> tuple[dict, jax.Array]:
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32), "n": jnp.int32(0)}, jnp.ones((8, 8), jnp.float32)


def run_twice(fn: object) -> list[bytes]:
    state, x = args()
    out = []
    for _ in range(2):
        state, total = fn(state, x)
        out += [np.asarray(state["w"]).tobytes(), np.asarray(total).tobytes()]
    return out


def test_second_start_loads_without_tracing_and_gives_the_same_bits(tmp_path: Path) -> None:
    reference = run_twice(make_step())
    first = aot.compiled(make_step(), args(), "step", {"lr": 0.1}, tmp_path)
    assert len(list(tmp_path.glob("*.jaxexe"))) == 1
    assert run_twice(first) == reference
    TRACES.clear()
    second = aot.compiled(make_step(), args(), "step", {"lr": 0.1}, tmp_path)
    assert TRACES == []  # neither traced nor lowered: loaded from the file
    assert run_twice(second) == reference


def test_a_different_program_is_a_different_entry(tmp_path: Path) -> None:
    aot.compiled(make_step(), args(), "step", {"lr": 0.1}, tmp_path)
    aot.compiled(make_step(), args(), "step", {"lr": 0.2}, tmp_path)
    assert len(list(tmp_path.glob("*.jaxexe"))) == 2


def small_args() -> tuple[dict, jax.Array]:
    return {"w": jnp.ones((4, 4), jnp.float32), "n": jnp.int32(0)}, jnp.ones((4, 4), jnp.float32)


def test_other_arguments_under_the_same_program_compile_and_replace_the_entry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file is named by the program alone; the key stored in it covers the arguments and must match."""
    aot.compiled(make_step(), args(), "step", {}, tmp_path)
    TRACES.clear()
    fn = aot.compiled(make_step(), small_args(), "step", {}, tmp_path)
    assert TRACES == [1]  # compiled, not the 8x8 executable
    assert "compiled for other arguments" in capsys.readouterr().err
    state, x = small_args()
    assert np.array_equal(np.asarray(fn(state, x)[0]["w"]), np.asarray(make_step()(*small_args())[0]["w"]))
    assert len(list(tmp_path.glob("*.jaxexe"))) == 1
    TRACES.clear()
    aot.compiled(make_step(), small_args(), "step", {}, tmp_path)
    assert TRACES == []  # the entry now holds the 4x4 one


def test_prefetch_loads_before_the_arguments_exist(tmp_path: Path) -> None:
    """A Prefetch needs only the program; its executable is used when the arguments' key matches."""
    aot.compiled(make_step(), args(), "step", {"lr": 0.1}, tmp_path)
    prefetch = aot.Prefetch("step", {"lr": 0.1}, tmp_path)
    TRACES.clear()
    fn = aot.compiled(make_step(), args(), "step", {"lr": 0.1}, tmp_path, prefetch)
    assert TRACES == []
    assert fn is prefetch.take(aot.cache_key("step", {"lr": 0.1}, args()))  # the prefetched object itself
    assert run_twice(fn) == run_twice(make_step())


def test_prefetch_of_a_mismatch_or_of_nothing_compiles(tmp_path: Path) -> None:
    aot.compiled(make_step(), args(), "step", {}, tmp_path)
    prefetch = aot.Prefetch("step", {}, tmp_path)
    TRACES.clear()
    fn = aot.compiled(make_step(), small_args(), "step", {}, tmp_path, prefetch)
    assert TRACES == [1]
    assert np.asarray(fn(*small_args())[1]) == np.asarray(make_step()(*small_args())[1])
    nothing = aot.Prefetch("step", {"other": 1}, tmp_path)
    assert nothing.take(aot.cache_key("step", {"other": 1}, args())) is None
    TRACES.clear()
    aot.compiled(make_step(), args(), "step", {"other": 1}, tmp_path, nothing)
    assert TRACES == [1]


def test_a_corrupt_file_is_replaced_by_a_compile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    aot.compiled(make_step(), args(), "step", {}, tmp_path)
    (path,) = tmp_path.glob("*.jaxexe")
    path.write_bytes(b"not an executable")
    TRACES.clear()
    fn = aot.compiled(make_step(), args(), "step", {}, tmp_path)
    assert TRACES == [1]
    assert "ignoring the cached executable" in capsys.readouterr().err
    assert run_twice(fn) == run_twice(make_step())
    assert path.stat().st_size > 1000  # rewritten


def test_a_corrupt_file_found_by_the_prefetch_costs_a_compile(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    aot.compiled(make_step(), args(), "step", {}, tmp_path)
    (path,) = tmp_path.glob("*.jaxexe")
    path.write_bytes(path.read_bytes()[:1000])  # torn mid-write
    with aot.Prefetch("step", {}, tmp_path) as prefetch:
        TRACES.clear()
        fn = aot.compiled(make_step(), args(), "step", {}, tmp_path, prefetch)
    assert TRACES == [1]
    assert "ignoring the cached executable" in capsys.readouterr().err
    assert run_twice(fn) == run_twice(make_step())


def test_no_directory_means_plain_jit(tmp_path: Path) -> None:
    step = make_step()
    assert aot.compiled(step, args(), "step", {}, None) is step


def test_only_the_newest_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aot, "KEEP", 2)
    for lr in (0.1, 0.2, 0.3):
        aot.compiled(make_step(), args(), "step", {"lr": lr}, tmp_path)
    assert len(list(tmp_path.glob("*.jaxexe"))) == 2


def test_sharded_over_some_of_the_devices(tmp_path: Path) -> None:
    """The executable keeps its own device assignment (here devices 4-7 of 8, in reverse order)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[4:8][::-1]), ("d",))
    sh = NamedSharding(mesh, P("d"))

    def make() -> jax.stages.Wrapped:
        return jax.jit(lambda x: x * 2 + 1, in_shardings=sh, out_shardings=sh, donate_argnums=0)

    def x() -> jax.Array:
        return jax.device_put(jnp.arange(16, dtype=jnp.float32), sh)

    aot.compiled(make(), (x(),), "f", {}, tmp_path)
    loaded = aot.compiled(make(), (x(),), "f", {}, tmp_path)
    out = loaded(x())
    assert out.sharding == sh
    assert np.array_equal(np.asarray(out), np.arange(16) * 2 + 1)


def test_a_step_in_jaxs_own_cache_is_compiled_afresh_before_it_is_kept(tmp_path: Path, jit_cache: Path) -> None:
    """An executable loaded from JAX's persistent cache serializes without its machine code on XLA:CPU (its
    stored copy fails at the first call), so a miss here must not take the step from JAX's cache."""
    make_step().lower(*args()).compile()  # now in JAX's persistent cache (jit_cache)
    aot.compiled(make_step(), args(), "step", {"jax-cache": 1}, tmp_path)
    TRACES.clear()
    loaded = aot.compiled(make_step(), args(), "step", {"jax-cache": 1}, tmp_path)
    assert TRACES == []
    assert run_twice(loaded) == run_twice(make_step())
