"""Compiled train steps kept on disk, so a restart skips tracing, lowering and compiling.

JAX's persistent compilation cache skips only XLA's compile. Tracing the model and lowering it still
cost ~2 s (small config) to ~6 s (125M) on every start, against a 2-3 s step (benchmarks/README.md §3).
This module stores the serialized executable beside that cache, under a key made of everything the
program depends on: the model/optimizer/mesh config and ``train.steps`` (the LR schedule), jaxckpt's
own source, the library versions, the devices, XLA flags, JAX's numerics settings, and the abstract
arguments (shapes, dtypes, shardings). A miss or an unreadable file means an ordinary compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from jaxckpt.metrics import log

KEEP = 16  # executables kept per directory, most recently used first
JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_rank_promotion", "jax_use_shardy_partitioner")


@cache
def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def cache_key(name: str, program: dict[str, Any], args: tuple) -> str:
    """A digest of everything the compiled program ``name`` depends on."""
    def aval(x: Any) -> str:
        return f"{tuple(x.shape)}:{x.dtype}:{getattr(x, 'sharding', None)}"

    parts = {
        "name": name, "program": program, "source": _source_digest(),
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "flax", "optax")},
        "devices": [(d.id, d.process_index, d.platform, d.device_kind) for d in jax.devices()],
        "process": (jax.process_index(), jax.process_count()),
        "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")},
        "jax": {k: str(getattr(jax.config, k, None)) for k in JAX_SETTINGS},
        "args": [str(jax.tree.structure(args)), [aval(x) for x in jax.tree.leaves(args)]],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _load(path: Path) -> Any | None:
    from jax.experimental import serialize_executable

    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree, device_ids = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}
        devices = [by_id[i] for i in device_ids]  # the executable's own device assignment, in order
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a stale or torn file: compile instead, and replace it
        log(f"ignoring the cached executable {path.name} ({type(e).__name__}: {e}); compiling")
        path.unlink(missing_ok=True)
        return None
    os.utime(path)
    return compiled


def _store(path: Path, compiled: Any) -> None:
    from jax.experimental import serialize_executable

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]  # noqa: SLF001
        with open(tmp, "wb") as f:
            pickle.dump((*serialize_executable.serialize(compiled), device_ids), f)
        os.replace(tmp, path)
        for old in sorted(path.parent.glob("*.jaxexe"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]:
            old.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - a full disk or an executable that cannot be serialized
        tmp.unlink(missing_ok=True)
        log(f"could not keep the compiled step in {path.parent} ({type(e).__name__}: {e})")


def compiled(jitted: Any, args: tuple, name: str, program: dict[str, Any], directory: Path | None) -> Callable:
    """``jitted`` compiled for ``args``: loaded from ``directory`` if it holds this exact program, else
    compiled (and stored there). Without a directory, ``jitted`` itself."""
    if directory is None:
        return jitted
    path = directory / f"{name}-{cache_key(name, program, args)[:40]}.jaxexe"
    loaded = _load(path)
    if loaded is not None:
        return loaded
    result = jitted.lower(*args).compile()
    _store(path, result)
    return result
