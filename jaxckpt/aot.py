"""Compiled train steps kept on disk, so a restart skips tracing, lowering and compiling.

JAX's persistent compilation cache skips only XLA's compile. Tracing the model and lowering it still
cost ~2 s (small config) to ~6 s (125M) on every start, against a 2-3 s step (benchmarks/README.md §3).
This module stores the serialized executable beside that cache. The file is named by what the program
depends on short of its arguments: the model/optimizer/mesh config, ``train.steps`` (the LR schedule) and
the batch size, jaxckpt's own source, the library versions, the devices and XLA flags. So the trainer can
start loading it on a thread (``Prefetch``) before the model and state exist. The file also holds a key
over JAX's numerics settings and the abstract arguments (shapes, dtypes, shardings), which must match
before the executable is used. A miss, a mismatch or an unreadable file means an ordinary compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
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


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def program_key(name: str, program: dict[str, Any]) -> str:
    """A digest of what the compiled program ``name`` depends on, short of its arguments: it names the
    file, so the file can be found (and loaded) before the arguments exist."""
    return _digest({
        "name": name, "program": program, "source": _source_digest(),
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "flax", "optax")},
        "devices": [(d.id, d.process_index, d.platform, d.device_kind) for d in jax.devices()],
        "process": (jax.process_index(), jax.process_count()),
        "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")},
    })


def cache_key(name: str, program: dict[str, Any], args: tuple) -> str:
    """A digest of everything the compiled program ``name`` depends on: ``program_key`` plus JAX's
    numerics settings and the abstract arguments. Stored in the file; a load must match it."""
    return _full_key(program_key(name, program), args)


def _full_key(program_digest: str, args: tuple) -> str:
    def aval(x: Any) -> str:
        return f"{tuple(x.shape)}:{x.dtype}:{getattr(x, 'sharding', None)}"

    return _digest({
        "program": program_digest,
        "jax": {k: str(getattr(jax.config, k, None)) for k in JAX_SETTINGS},
        "args": [str(jax.tree.structure(args)), [aval(x) for x in jax.tree.leaves(args)]],
    })


def _path(directory: Path, name: str, program_digest: str) -> Path:
    return directory / f"{name}-{program_digest[:40]}.jaxexe"


def _load(path: Path) -> tuple[str, Any] | None:
    """(the key it was stored under, the loaded executable), or None if there is no usable file."""
    from jax.experimental import serialize_executable

    try:
        with open(path, "rb") as f:
            key, payload, in_tree, out_tree, device_ids = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}
        devices = [by_id[i] for i in device_ids]  # the executable's own device assignment, in order
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a stale or torn file: compile instead, and replace it
        log(f"ignoring the cached executable {path.name} ({type(e).__name__}: {e}); compiling")
        path.unlink(missing_ok=True)
        return None
    return key, compiled


class Prefetch:
    """Loads the stored ``name`` on a thread, e.g. while the trainer builds its model and restores the
    checkpoint (XLA's deserialization releases the GIL). Never compiles there: a miss is found at ``take``."""

    def __init__(self, name: str, program: dict[str, Any], directory: Path | None):
        self.path = _path(directory, name, program_key(name, program)) if directory is not None else None
        self._loaded: tuple[str, Any] | None = None
        self._thread: threading.Thread | None = None
        if self.path is not None and self.path.is_file():
            from jax.experimental import serialize_executable  # noqa: F401 - imported here, not on the thread

            self._thread = threading.Thread(target=self._load, name="jaxckpt-load-executable", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        self._loaded = _load(self.path)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        """Waits for the load, so no thread is left inside XLA when the process exits."""
        if self._thread is not None:
            self._thread.join()

    def take(self, key: str) -> Any | None:
        """The loaded executable if it was stored under ``key``, else None (after the load has ended)."""
        if self._thread is None:
            return None
        self._thread.join()
        return _matching(self.path, self._loaded, key)


def _matching(path: Path, loaded: tuple[str, Any] | None, key: str) -> Any | None:
    if loaded is None:
        return None
    if loaded[0] != key:
        log(f"the cached executable {path.name} was compiled for other arguments or JAX settings; compiling")
        return None
    os.utime(path)
    return loaded[1]


def _store(path: Path, key: str, compiled: Any) -> None:
    from jax.experimental import serialize_executable

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]  # noqa: SLF001
        with open(tmp, "wb") as f:
            pickle.dump((key, *serialize_executable.serialize(compiled), device_ids), f)
        os.replace(tmp, path)
        for old in sorted(path.parent.glob("*.jaxexe"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]:
            old.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - a full disk or an executable that cannot be serialized
        tmp.unlink(missing_ok=True)
        log(f"could not keep the compiled step in {path.parent} ({type(e).__name__}: {e})")


def compiled(jitted: Any, args: tuple, name: str, program: dict[str, Any], directory: Path | None,
             prefetch: Prefetch | None = None) -> Callable:
    """``jitted`` compiled for ``args``: loaded from ``directory`` if it holds this exact program (taken
    from ``prefetch`` if one was started), else compiled and stored there. Without a directory, ``jitted``."""
    if directory is None:
        return jitted
    digest = program_key(name, program)  # once: it reads versions and devices
    key, path = _full_key(digest, args), _path(directory, name, digest)
    if prefetch is not None and prefetch.path == path:
        loaded = prefetch.take(key)
    else:
        loaded = _matching(path, _load(path), key)
    if loaded is not None:
        return loaded
    result = _compile_fresh(jitted, args)
    _store(path, key, result)
    return result


def _compile_fresh(jitted: Any, args: tuple) -> Any:
    """``jitted`` compiled by XLA, never taken from JAX's persistent cache. On XLA:CPU an executable
    loaded from that cache serializes without its machine code, and the stored copy then fails at its
    first call ("Function ... not found"). JAX decides once per process whether to use its cache, so the
    switch needs a reset on each side."""
    from jax.experimental.compilation_cache import compilation_cache

    if not jax.config.jax_enable_compilation_cache:
        return jitted.lower(*args).compile()
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return jitted.lower(*args).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()
