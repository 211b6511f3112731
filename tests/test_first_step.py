"""trainer.first_step: on the CPU backend the process's first step runs without donating the state, as a
step beside a save does, and computes the same bits as a donating step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxckpt.trainer import first_step


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
