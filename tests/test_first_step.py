"""trainer.first_step: on the CPU backend the process's first step runs without donating the state, as a
step beside a save does, and computes the same bits as a donating step; before it, the allocator keeps room for
two calls' temporaries at once and the outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxckpt import malloc
from jaxckpt.trainer import first_step, step_blocks


def step(state: dict, x: jax.Array) -> tuple[dict, dict]:
    w = state["w"] - 0.1 * jnp.tanh(state["w"] * x)
    return {"w": w, "n": state["n"] + 1}, {"loss": jnp.sum(w)}


def sharded_state() -> dict:
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    w = np.random.default_rng(0).normal(size=(len(jax.devices()) * 4, 16)).astype(np.float32)
    return {"w": jax.device_put(w, NamedSharding(mesh, PartitionSpec("fsdp"))), "n": jnp.int32(0)}


def test_the_first_step_keeps_its_input_and_computes_the_donating_steps_bits() -> None:
    assert jax.default_backend() == "cpu" and jax.device_count() > 1
    fn = jax.jit(step, donate_argnums=0)
    x = jnp.float32(0.5)
    donated = sharded_state()
    reference = fn(donated, x)
    assert donated["w"].is_deleted()  # a plain call donates: the test can tell the difference
    kept = sharded_state()
    out = first_step(fn, kept, x)
    assert not kept["w"].is_deleted() and not kept["n"].is_deleted()
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference), strict=True):
        assert a.sharding == b.sharding and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_the_first_step_keeps_room_for_two_calls_temporaries_and_the_outputs(monkeypatch) -> None:
    kept = []
    monkeypatch.setattr(malloc, "release_free_memory", lambda keep=(): kept.append(tuple(keep)) or True)
    fn = jax.jit(lambda s, x: ({"w": jnp.tanh(s["w"] @ s["w"].T) @ s["w"] * x, "n": s["n"]}, {}), donate_argnums=0)
    state, x = sharded_state(), jnp.float32(0.5)
    stats = fn.lower(state, x).compile().memory_analysis()
    first_step(fn, state, x)
    temps, outputs = stats.temp_size_in_bytes, stats.output_size_in_bytes
    assert temps > 0 and outputs > 0 and kept == [(temps, temps, outputs)]
    assert step_blocks(fn.lower(state, x).compile(), state, x) == kept[0]  # an AOT-compiled step (jaxckpt.aot)
    assert step_blocks(lambda s, x: s, state, x) == ()  # nothing to ask: nothing kept
