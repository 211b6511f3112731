"""Checkpoint save/restore of a ~1 GB fp32 train state: jaxckpt's Orbax settings vs stock Orbax vs the disk.

    python benchmarks/checkpoint.py                       # jaxckpt + stock Orbax, 2 reps (~4-6 min)
    python benchmarks/checkpoint.py --gb 0.25 --reps 1    # quick
    python benchmarks/checkpoint.py --devices 8           # state sharded over 8 fake CPU devices
    python benchmarks/checkpoint.py --variants jaxckpt,zarr3,target64m,io-sync-off   # experiments
    python benchmarks/checkpoint.py --list-variants
    python benchmarks/checkpoint.py --devices 8 --phases 6   # where one restore's time goes (6 in a row)
    python benchmarks/checkpoint.py --devices 8 --saves 6    # also: blocking of the 5 saves after the first

The state is jaxckpt's own train state (params + AdamW moments + step + rng, created sharded by
``jaxckpt.state.create_state`` for a GPT-style config sized to ``--gb``), filled with random values so
compression cannot cheat on all-zero moments. Every phase runs in a fresh subprocess so its peak RSS
(VmHWM, reset just before the phase) is separable. Per repetition: dd, numpy, then each variant's
save and restore; medians over repetitions are reported. GB = 1e9 bytes.

Save: *blocking* = time ``CheckpointManager.save()`` holds the caller; *durable* = from ``save()`` to
``wait_until_finished()`` plus an fsync of every file and directory of the checkpoint and its parent
(TensorStore fsyncs its data files itself, but Orbax writes its metadata files and renames the
directories without fsync; the fsync pass is timed and shown on its own). The table times the first save
in its process; with ``--saves N`` the same process then saves N-1 more times (new jax.Array objects over the
same buffers, each waited for) and a line gives their blocking, as later saves of a training run would see it.
Every timed write (``dd``, ``np.save``, each variant's and PyTorch's save) starts after ``benchlib.settle_memory``:
10 s idle, then 2.5x the bytes it writes touched and freed in its own process (the parent's for ``dd``), so that
every writer fills its page cache from memory the VM's host still backs (README §1, eleventh session).
Restore: into the target shardings (ShapeDtypeStructs with NamedShardings), in a fresh process:
a first restore (page cache warm from the save), then *cold* (after ``echo 3 > drop_caches``, or
``posix_fadvise(DONTNEED)`` on every checkpoint file if that is not permitted), then *warm* again:
``benchlib.WARM_TRIALS`` warm restores in a row, of which the median is reported (the report lists them all).

References per repetition, after the variants: *numpy memcpy* -- ``np.copyto`` of the state's bytes into a
fresh, never-touched buffer (page faults included: the floor for any restore from page cache), then again into
the touched buffer; and, run by ``benchmarks/torch_ckpt.py`` under ``--torch-python`` (default: the repo's
``.venv-torch/bin/python``, else this interpreter if it has torch), the same bytes through ``torch.save`` (+ the
fsync pass) / ``torch.load`` and PyTorch DCP ``async_save`` (blocking = until it returns its future; durable =
``future.result()`` + the fsync pass) / ``dcp.load``, timed as above.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys


def _early_devices(argv: list[str]) -> int:
    """``--devices N`` must take effect before JAX is imported."""
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return 1


N_DEVICES = _early_devices(sys.argv)
if N_DEVICES > 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

try:  # run as a file (benchmarks/ is sys.path[0]), or imported as benchmarks.<name> from the repo root
    import benchlib
except ImportError:
    from benchmarks import benchlib
from jaxckpt import checkpoint as ckpt_lib

try:  # the CRC32 manifest jaxckpt writes after each save and checks on resume
    from jaxckpt import integrity
except ImportError:  # older library: no manifest
    integrity = None  # type: ignore[assignment]
try:  # jaxckpt's own reader of its state item (checkpoint.fast_restore)
    from jaxckpt import fastread
except ImportError:
    fastread = None  # type: ignore[assignment]
from jaxckpt.checkpoint import make_manager
from jaxckpt.config import MeshConfig, ModelConfig, OptimConfig
from jaxckpt.mesh import make_mesh
from jaxckpt.optim import make_optimizer
from jaxckpt.state import ModelDef, abstract_state

PyTree = Any
MiB = benchlib.MiB

# ----------------------------------------------------------------------------------------------
# The state


def model_config(gb: float) -> ModelConfig:
    """A GPT-style config whose params + 2 Adam moments (12 bytes/param) come to about ``gb`` GB."""
    d, ff = 768, 2048
    vocab = 32768 if gb >= 0.6 else 4096
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    layers = max(1, round((gb * 1e9 / 12 - vocab * d) / per_layer))
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=12, d_ff=ff, seq_len=128)


def pieces(gb: float) -> tuple[ModelDef, Any, Any]:
    mdef = ModelDef.build(model_config(gb))
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))  # params sharded over all devices (FSDP)
    return mdef, make_optimizer(OptimConfig(), 1000), mesh


def build_state(gb: float) -> PyTree:
    """jaxckpt's train-state tree (``abstract_state``), every leaf a sharded jax.Array with random-looking data.

    Float leaves are tiled from a 64 MiB block of N(0, 0.02) (longer than any zstd window, so compression
    cannot cheat as it would on fresh all-zero Adam moments); integer leaves are zeros. Built with numpy +
    ``jax.device_put`` because XLA's RNG runs at ~10 M values/s on these 2 cores.
    """
    abstract = target(gb)
    block = benchlib.noise_block()

    def leaf(i: int, a: jax.ShapeDtypeStruct) -> jax.Array:
        host = np.zeros(a.shape, a.dtype)
        if jnp.issubdtype(a.dtype, jnp.floating):
            benchlib.fill_leaf(i, host, block)
        return jax.device_put(host, a.sharding)

    leaves, treedef = jax.tree.flatten(abstract)
    return jax.block_until_ready(jax.tree.unflatten(treedef, [leaf(i, a) for i, a in enumerate(leaves)]))


def target(gb: float) -> PyTree:
    mdef, tx, mesh = pieces(gb)
    return abstract_state(mdef, tx, mesh)


def tree_bytes(tree: PyTree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def checksum(tree: PyTree) -> float:
    return float(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Variants: how a checkpoint is written and read


@dataclass(frozen=True)
class Variant:
    about: str
    manager: Callable[[Path], ocp.CheckpointManager]
    save: Callable[[PyTree], Any]
    restore: Callable[[PyTree], Any]
    ts_context: dict[str, Any] = field(default_factory=dict)  # extra TensorStore context (patched in)
    aligned_reads: bool = False  # patch Orbax to read into 64-byte-aligned buffers (see aligned_read_shard)
    manifest: bool = False  # jaxckpt's CRC32 manifest after the save / verify before restore (if the lib has it)
    fast_restore: bool = False  # restore the state with jaxckpt.fastread (the trainer's default), not Orbax
    gc_paused: bool = False  # save under jaxckpt.checkpoint.gc_paused, as jaxckpt's Checkpointer does
    gc_frozen: bool = False  # objects alive at the save's start exempt from GC until it ends (gcpause.freeze)
    orbax_d2h: bool = False  # hand shards to the host with Orbax's own ArrayHandler, not jaxckpt.d2h's
    per_shard_writes: bool = False  # write each shard through Orbax's own coroutine, not jaxckpt.shard_writes
    loop_waits: bool = False  # shard_writes as before the fifteenth session: writes awaited in the event loop,
    #                           cyclic GC left on while they run
    background: bool = False  # return once the bytes are on the host (jaxckpt.checkpoint.SaveStart), as the
    #                           Checkpointer does on one process; Orbax's save call then runs on a thread
    early_crc: bool = False  # while waiting, checksum the files Orbax has finished (integrity.EarlyChecksums)


def _restore_args(abstract: PyTree) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _pytree_manager(async_options: ocp.AsyncOptions | None = None,
                    **handler_kwargs: Any) -> Callable[[Path], ocp.CheckpointManager]:
    """Like jaxckpt.checkpoint.make_manager, with a PyTreeCheckpointHandler built from ``handler_kwargs``."""

    def make(directory: Path) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True,
                                               save_decision_policy=None, enable_background_delete=False,
                                               async_options=async_options)
        handlers = {"state": ocp.PyTreeCheckpointHandler(**handler_kwargs), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

    return make


def _pytree_save(chunk_byte_size: int | None = None, target_file_size: int | None = None) -> Callable:
    def save(state: PyTree) -> ocp.args.PyTreeSave:
        save_args = None
        if chunk_byte_size:
            save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_byte_size), state)
        return ocp.args.PyTreeSave(state, save_args=save_args, ocdbt_target_data_file_size=target_file_size)

    return save


def _handler_kwargs(**changes: Any) -> dict[str, Any]:
    """jaxckpt's state_handler() settings (type handlers included, if the library defines them) + ``changes``."""
    base: dict[str, Any] = {"use_ocdbt": True, "use_zarr3": True, "use_compression": False}
    registry = getattr(ckpt_lib, "_type_handlers", None)
    if registry is not None:
        base["type_handler_registry"] = registry()
    return {**base, **changes}


def _ours(about: str, handler: dict[str, Any], ctx: dict[str, Any] | None = None, **save: Any) -> Variant:
    """A variant with a differently configured PyTreeCheckpointHandler (not jaxckpt's make_manager)."""
    async_options = handler.pop("async_options", None)
    make = lambda d: _pytree_manager(async_options, **_handler_kwargs(**handler))(d)  # noqa: E731
    return Variant(about, make, _pytree_save(**save), _restore_args, ctx or {})


def _lib(about: str, ctx: dict[str, Any] | None = None, aligned: bool = False, **save: Any) -> Variant:
    """jaxckpt's own make_manager() with different save args / TensorStore context / read patch."""
    return Variant(about, make_manager, _pytree_save(**save), _restore_args, ctx or {}, aligned, manifest=True)


T64 = 64 * MiB
JAXCKPT = Variant("jaxckpt.checkpoint.make_manager as shipped (PyTreeSave/PyTreeRestore)", make_manager,
                  _pytree_save(target_file_size=getattr(ckpt_lib, "OCDBT_TARGET_FILE_BYTES", None)),
                  _restore_args, manifest=True, fast_restore=fastread is not None,
                  gc_paused=hasattr(ckpt_lib, "gc_paused"), background=hasattr(ckpt_lib, "SaveStart"),
                  gc_frozen=hasattr(getattr(ckpt_lib, "gcpause", None), "freeze"),
                  early_crc=hasattr(integrity, "EarlyChecksums"))
VARIANTS: dict[str, Variant] = {
    # Picks up jaxckpt.checkpoint.OCDBT_TARGET_FILE_BYTES if the library defines it (proposed in README.md).
    "jaxckpt": JAXCKPT,
    "jaxckpt-sync-start": replace(JAXCKPT, background=False, about="jaxckpt as shipped, but save() returns when "
                                  "Orbax's save call does (no jaxckpt.checkpoint.SaveStart thread)"),
    # Without jaxckpt.d2h there is no snapshot for Orbax's call to take, so no SaveStart either.
    "jaxckpt-late-crc": replace(JAXCKPT, early_crc=False, about="jaxckpt as shipped, but every CRC32 of the "
                                "manifest is taken after Orbax's commit (no integrity.EarlyChecksums)"),
    "jaxckpt-orbax-d2h": replace(JAXCKPT, background=False, orbax_d2h=True, about="jaxckpt-sync-start, but with "
                                 "Orbax's own device-to-host step (no jaxckpt.d2h)"),
    "jaxckpt-per-shard": replace(JAXCKPT, per_shard_writes=True, about="jaxckpt as shipped, but each shard "
                                 "written through Orbax's own coroutine (no jaxckpt.shard_writes)"),
    "jaxckpt-loop-wait": replace(JAXCKPT, loop_waits=True, about="jaxckpt as shipped, but each array's shard "
                                 "writes awaited in Orbax's event loop, with cyclic GC on (jaxckpt.shard_writes "
                                 "before the fifteenth session)"),
    "jaxckpt-no-freeze": replace(JAXCKPT, gc_frozen=False, about="jaxckpt as shipped, but the objects alive at "
                                 "a save's start left to GC's full collections (no jaxckpt.gcpause.freeze)"),
    "jaxckpt-one-store": replace(JAXCKPT, manager=lambda d: make_manager(d, store_bytes=1 << 62),
                                 about="jaxckpt as shipped, but every save in one OCDBT store per process "
                                 "(no jaxckpt.substores split above checkpoint.ocdbt_store_mb)"),
    "jaxckpt-orbax-read": Variant("jaxckpt's save (no GC pause); restore through Orbax (fast_restore=false)",
                                  make_manager, _pytree_save(target_file_size=ckpt_lib.OCDBT_TARGET_FILE_BYTES),
                                  _restore_args, manifest=True),
    "stock": Variant("ocp.CheckpointManager defaults: StandardSave/Restore (OCDBT, zarr2, zstd)",
                     lambda d: ocp.CheckpointManager(d), ocp.args.StandardSave, ocp.args.StandardRestore),
    **{f"target{m}m": _lib(f"jaxckpt + PyTreeSave(ocdbt_target_data_file_size={m} MiB) (Orbax default 2 GiB)",
                           target_file_size=m * MiB) for m in (16, 32, 64, 128, 256)},
    "aligned": _lib("jaxckpt + restore reads into 64-byte-aligned buffers (jax.device_put aliases them: no copy)",
                    aligned=True),
    "best": _lib("jaxckpt + ocdbt_target_data_file_size=64 MiB + aligned restore reads", aligned=True,
                 target_file_size=T64),
    "chunk16m": _lib("jaxckpt + SaveArgs(chunk_byte_size=16 MiB) on every leaf", chunk_byte_size=16 * MiB),
    "chunk64m": _lib("jaxckpt + SaveArgs(chunk_byte_size=64 MiB) on every leaf", chunk_byte_size=64 * MiB),
    "t64-chunk16m": _lib("target64m + SaveArgs(chunk_byte_size=16 MiB)", target_file_size=T64,
                         chunk_byte_size=16 * MiB),
    "io8": _lib("jaxckpt + TensorStore file_io_concurrency=8 (default 128)", {"file_io_concurrency": {"limit": 8}}),
    "copy1": _lib("jaxckpt + TensorStore data_copy_concurrency=1 (default: #cores)",
                  {"data_copy_concurrency": {"limit": 1}}),
    "t64-io8": _lib("target64m + file_io_concurrency=8", {"file_io_concurrency": {"limit": 8}}, target_file_size=T64),
    "t64-copy1": _lib("target64m + data_copy_concurrency=1", {"data_copy_concurrency": {"limit": 1}},
                      target_file_size=T64),
    "io-sync-off": _lib("jaxckpt + TensorStore file_io_sync=false (durable only through the fsync pass)",
                        {"file_io_sync": False}),
    "zarr3": _ours("zarr3 without OCDBT (one directory per array), no compression", {"use_ocdbt": False}),
    "zarr2-raw": _ours("OCDBT + zarr2, no compression", {"use_zarr3": False}),
    "concurrent1": _ours("jaxckpt handler + save/restore_concurrent_gb=1",
                         {"save_concurrent_gb": 1, "restore_concurrent_gb": 1}),
    "syncdirs": _ours("jaxckpt handler + AsyncOptions(create_directories_asynchronously=False)",
                      {"async_options": ocp.AsyncOptions(create_directories_asynchronously=False)}),
}
DEFAULT_VARIANTS = "jaxckpt,stock"


async def aligned_read_shard(t: Any, *, new_shard_shape: Any, dtype: Any, requested_domain: Any,
                             restricted_domain: Any) -> np.ndarray:
    """Orbax's ``serialization._read_shard`` with a 64-byte-aligned destination.

    Orbax reads each shard into ``np.zeros(...)`` and then ``jax.device_put``s it. NumPy's large
    allocations sit 16 bytes past a page boundary, and the CPU client copies any buffer that is not
    64-byte aligned (aligned ones are aliased, zero-copy) -- a full extra copy of the state.
    """
    np_dtype = np.dtype(t.dtype.numpy_dtype)
    nbytes = math.prod(new_shard_shape) * np_dtype.itemsize
    raw = np.zeros(nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    out = raw[off : off + nbytes].view(np_dtype).reshape(new_shard_shape)
    await ts.array(out)[ts.d[:].translate_to[requested_domain.origin]][restricted_domain].write(t[restricted_domain])
    if dtype is not None:  # as Orbax does: cast off the event loop (a no-op when the dtype already matches)
        out = await asyncio.to_thread(out.astype, dtype, copy=False)
    return out


async def awaited_in_loop(writes: list[Any]) -> None:
    """Each TensorStore write awaited in the event loop (each hands its result back through the GIL)."""
    for write in writes:
        await write


def apply_patches(variant: Variant) -> None:
    patch_ts_context(variant.ts_context)
    if variant.orbax_d2h:  # make_manager's handlers are built per manager: this process gets Orbax's own
        ckpt_lib.d2h.LeanArrayHandler = ocp.type_handlers.ArrayHandler
    shard_writes = getattr(ckpt_lib.d2h, "shard_writes", None)  # None in a jaxckpt from before it
    if variant.per_shard_writes and shard_writes is not None:  # no save's limiter is marked
        shard_writes.mark = lambda limiters: None
    if variant.loop_waits and hasattr(shard_writes, "wait_for"):
        shard_writes.wait_for = awaited_in_loop
        shard_writes.gcpause = types.SimpleNamespace(paused=contextlib.nullcontext)
    if variant.aligned_reads:
        from orbax.checkpoint._src.serialization import serialization

        serialization._read_shard = aligned_read_shard


def patch_ts_context(extra: dict[str, Any]) -> None:
    """Add ``extra`` to every TensorStore context Orbax creates (this process only)."""
    if not extra:
        return
    original = ts_utils.get_ts_context

    def get_ts_context(**kwargs: Any) -> Any:
        return ts.Context({**original(**kwargs).spec.to_json(), **extra})

    ts_utils.get_ts_context = get_ts_context


# ----------------------------------------------------------------------------------------------
# OS helpers: benchmarks/benchlib.py

# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def warm_up(variant: Variant, scratch: Path) -> None:
    """One tiny save + restore so one-off initialisation (thread pools, imports) is not timed."""
    tiny = {"a": jnp.ones((64,), jnp.float32)}
    with variant.manager(scratch) as mgr:
        mgr.save(0, args=ocp.args.Composite(state=variant.save(tiny)))
        mgr.wait_until_finished()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tiny)
        mgr.restore(0, args=ocp.args.Composite(state=variant.restore(abstract)))
    shutil.rmtree(scratch, ignore_errors=True)


def worker_save(args: argparse.Namespace) -> dict[str, Any]:
    variant, directory = VARIANTS[args.variant], Path(args.dir)
    apply_patches(variant)
    warm_up(variant, directory.with_name(directory.name + "-warmup"))
    baseline = benchlib.proc_status_mb("VmRSS")  # runtime + imports, before the state exists
    state = build_state(args.gb)
    out: dict[str, Any] = {"state_bytes": tree_bytes(state), "baseline_mb": baseline}
    mgr = variant.manager(directory)
    gc.collect()
    benchlib.settle_memory(out["state_bytes"])
    benchlib.reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    start = start_save(mgr, variant, 1, state)
    t1 = time.perf_counter()
    checksums = integrity.EarlyChecksums(lambda: directory.glob("1.orbax-checkpoint-tmp*")).start() \
        if variant.early_crc else None  # as Checkpointer.wait() does while its caller waits
    finish_save(mgr, variant, start)
    t2 = time.perf_counter()
    out["dirty_after_wait_mb"] = benchlib.dirty_mb()
    benchlib.fsync_tree(directory / "1")
    known = checksums.stop() if checksums is not None else None
    t3, out["cpu_s"] = time.perf_counter(), time.process_time() - c0
    out["peak_rss_mb"] = benchlib.proc_status_mb("VmHWM")
    # Only now: XLA's checksum programs and temporaries left ~0.17x the state in RSS (8 devices), which
    # counted as the save's peak when the checksum came before it.
    out["checksum"] = checksum(state)
    out["later_blocking_s"] = later_saves(mgr, variant, state, args.saves)
    mgr.close()
    if variant.manifest and integrity is not None:
        t4 = time.perf_counter()
        integrity.write_manifest(directory / "1", *([known] if known is not None else []))  # older libs: 1 arg
        out["manifest_s"] = time.perf_counter() - t4
    out.update(blocking_s=t1 - t0, wait_s=t2 - t0, fsync_s=t3 - t2, durable_s=t3 - t0,
               disk_bytes=benchlib.dir_bytes(directory / "1"))
    return out


def start_save(mgr: ocp.CheckpointManager, variant: Variant, step: int, state: PyTree) -> Any:
    """``mgr.save`` of ``state`` + a small meta item, as the variant saves (under the GC pause if it has one).
    Returns the ``SaveStart`` of a background variant, else None."""
    args = ocp.args.Composite(state=variant.save(state), meta=ocp.args.JsonSave({"step": step, "note": "benchmark"}))
    if variant.gc_frozen:
        ckpt_lib.gcpause.freeze()
    with ckpt_lib.gc_paused() if variant.gc_paused else contextlib.nullcontext():
        if variant.background:
            return ckpt_lib.SaveStart(mgr, step, args, state)
        mgr.save(step, args=args, force=True)
    return None


def finish_save(mgr: ocp.CheckpointManager, variant: Variant, start: Any) -> None:
    """Until Orbax has written everything (its save call first, where it runs on a thread)."""
    if start is not None:
        start.join()
    mgr.wait_until_finished()
    if variant.gc_frozen:
        ckpt_lib.gcpause.thaw()


def later_saves(mgr: ocp.CheckpointManager, variant: Variant, state: PyTree, n: int) -> list[float]:
    """Blocking seconds of saves 2..n in this process, each waited for before the next. Each saves new
    jax.Array objects over the same buffers, as a train step hands the Checkpointer new arrays every time."""
    out = []
    for step in range(2, n + 1):
        fresh = jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
            x.shape, x.sharding, [s.data for s in x.addressable_shards]), state)
        gc.collect()
        t0 = time.perf_counter()
        start = start_save(mgr, variant, step, fresh)
        out.append(time.perf_counter() - t0)
        finish_save(mgr, variant, start)
        mgr.delete(step)  # jaxckpt's manager moves it to TODELETE, which a Checkpointer empties at its next save
        shutil.rmtree(mgr.directory / getattr(ckpt_lib, "TODELETE", ".deleted"), ignore_errors=True)
    return out


def timed_restore(mgr: ocp.CheckpointManager, variant: Variant, abstract: PyTree) -> dict[str, Any]:
    gc.collect()
    benchlib.reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if variant.fast_restore:
        restored = fastread.restore(Path(mgr.directory) / "1" / "state", abstract)
    else:
        restored = mgr.restore(1, args=ocp.args.Composite(state=variant.restore(abstract)))["state"]
    jax.block_until_ready(restored)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = benchlib.proc_status_mb("VmHWM")
    same = all(x.sharding.is_equivalent_to(t.sharding, len(x.shape))
               for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True))
    out = {"s": dt, "cpu_s": cpu, "peak_rss_mb": peak, "checksum": checksum(restored), "shardings_ok": same}
    del restored
    gc.collect()
    return out


def worker_restore(args: argparse.Namespace) -> dict[str, Any]:
    variant, directory = VARIANTS[args.variant], Path(args.dir)
    apply_patches(variant)
    abstract = target(args.gb)
    warm_up(variant, directory.with_name(directory.name + "-warmup"))
    baseline = benchlib.proc_status_mb("VmRSS")
    with variant.manager(directory) as mgr:
        first = timed_restore(mgr, variant, abstract)  # peak RSS is only clean for this first one
        method = benchlib.drop_caches(directory)
        cold = timed_restore(mgr, variant, abstract)
        warm = benchlib.median_trial(lambda: timed_restore(mgr, variant, abstract))
    out = {"restore_first": first, "restore_cold": cold, "restore_warm": warm, "evict": method,
           "restore_baseline_mb": baseline}
    if variant.manifest and integrity is not None and integrity.has_manifest(directory / "1"):
        benchlib.drop_caches(directory)
        for label in ("verify_cold_s", "verify_warm_s"):
            t0 = time.perf_counter()
            out["verify_problems"] = integrity.verify(directory / "1")
            out[label] = time.perf_counter() - t0
    return out


def numpy_read(path: Path, abstract: PyTree) -> tuple[float, float]:
    """(seconds, peak RSS MB) to np.load every leaf from one file and device_put it into its sharding."""
    leaves, treedef = jax.tree.flatten(abstract)
    gc.collect()
    benchlib.reset_peak_rss()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        arrays = [np.load(f) for _ in leaves]
    restored = jax.device_put(arrays, [x.sharding for x in leaves])
    jax.block_until_ready(restored)
    dt, peak = time.perf_counter() - t0, benchlib.proc_status_mb("VmHWM")
    del arrays, restored
    gc.collect()
    return dt, peak


def worker_numpy(args: argparse.Namespace) -> dict[str, Any]:
    """Reference: every leaf np.save'd into one file, fsynced; then read back warm and cold."""
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "state.npy"
    baseline = benchlib.proc_status_mb("VmRSS")
    state = build_state(args.gb)
    gc.collect()
    benchlib.settle_memory(tree_bytes(state))
    benchlib.reset_peak_rss()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for x in jax.tree.leaves(state):
            np.save(f, np.asarray(x))
        f.flush()
        os.fsync(f.fileno())
    benchlib.fsync_dir(directory)
    out: dict[str, Any] = {"durable_s": time.perf_counter() - t0, "peak_rss_mb": benchlib.proc_status_mb("VmHWM"),
                           "baseline_mb": baseline}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    del state
    gc.collect()
    _, out["first_peak_rss_mb"] = numpy_read(path, abstract)  # page cache warm from the write
    out["evict"] = benchlib.drop_caches(directory)
    out["cold_s"], out["cold_peak_rss_mb"] = numpy_read(path, abstract)
    warm = benchlib.median_trial(lambda: dict(zip(("s", "peak_rss_mb"), numpy_read(path, abstract), strict=True)))
    out["warm_s"], out["warm_peak_rss_mb"], out["warm_trials_s"] = warm["s"], warm["peak_rss_mb"], warm["trials_s"]
    out["disk_bytes"] = path.stat().st_size
    return out


MEMCPY_TRIALS = 3  # the memcpy reference reports the fastest of these (a floor)


def fresh_views(src: list[np.ndarray]) -> list[np.ndarray]:
    """Views of one new ``np.empty`` buffer, a 64-byte-aligned slot per array: never-touched memory.

    At this size glibc always mmaps the buffer, so no page of it has been touched: the first copy into it
    takes every page fault (numpy madvises MADV_HUGEPAGE on large allocations, as for any numpy restore).
    """
    slots = [-(-a.nbytes // 64) * 64 for a in src]
    buf = np.empty(sum(slots) + 64, np.uint8)
    lo, views = -buf.ctypes.data % 64, []
    for a, n in zip(src, slots, strict=True):
        views.append(buf[lo : lo + a.nbytes].view(a.dtype).reshape(a.shape))
        lo += n
    return views


def timed_copy(dst: list[np.ndarray], src: list[np.ndarray]) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for d, a in zip(dst, src, strict=True):
        np.copyto(d, a)
    return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "peak_rss_mb": benchlib.proc_status_mb("VmHWM")}


def worker_memcpy(args: argparse.Namespace) -> dict[str, Any]:
    """Reference floor for any restore from page cache: ``np.copyto`` of the state's bytes into fresh memory,
    page faults included; then the same copy again into the now-touched buffer (memory bandwidth alone).
    Fastest of ``MEMCPY_TRIALS``, each into a new buffer (the last one is unmapped first): a floor, not a median."""
    state = build_state(args.gb)
    src = [np.asarray(x) for x in jax.tree.leaves(state)]  # host buffers (gathered if sharded), before timing
    gc.collect()
    baseline = benchlib.proc_status_mb("VmRSS")  # the source state is resident
    benchlib.reset_peak_rss()
    trials, ok = [], True
    for _ in range(MEMCPY_TRIALS):
        dst = fresh_views(src)  # np.empty only maps the pages: the faults land in the copy
        trials.append((timed_copy(dst, src), timed_copy(dst, src)))
        ok = ok and all(np.array_equal(d, a) for d, a in zip(dst, src, strict=True))
        del dst
        gc.collect()
    fresh = min((t[0] for t in trials), key=lambda t: t["s"])
    touched = min((t[1] for t in trials), key=lambda t: t["s"])
    return {"fresh": fresh, "touched": touched, "baseline_mb": baseline, "ok": ok,
            "fresh_trials_s": [t[0]["s"] for t in trials], "touched_trials_s": [t[1]["s"] for t in trials]}


PHASES = {"read_index": "OCDBT index", "_boxes": "target boxes", "_read_all": "read", "_to_devices": "to devices"}


def restore_phases(args: argparse.Namespace, root: Path, abstract: PyTree) -> str:
    """``--phases N``: where ``fastread.restore``'s time goes, over N restores of one save, in this process.

    The save is the ``jaxckpt`` variant's (the files jaxckpt writes). Each phase is one of fastread's
    functions, timed by wrapping it; "other" is the rest of the restore.
    """
    variant = VARIANTS["jaxckpt"]
    with variant.manager(root / "phases") as mgr:
        mgr.save(1, args=ocp.args.Composite(state=variant.save(build_state(args.gb))), force=True)
        mgr.wait_until_finished()
    spent: dict[str, list[float]] = {name: [] for name in PHASES}
    originals = {name: getattr(fastread, name) for name in PHASES}
    lines = ["| restore | total s | " + " | ".join(f"{v} s" for v in PHASES.values()) + " | other s |",
             "|" + "---|" * (len(PHASES) + 3)]
    try:
        for name, fn in originals.items():
            setattr(fastread, name, benchlib.timed(fn, spent[name]))
        for i in range(args.phases):
            for calls in spent.values():
                calls.clear()
            gc.collect()
            t0 = time.perf_counter()
            jax.block_until_ready(fastread.restore(root / "phases" / "1" / "state", abstract))
            ms = [round(x * 1e3) for x in (time.perf_counter() - t0, *(sum(spent[n]) for n in PHASES))]
            ms.append(ms[0] - sum(ms[1:]))  # "other" from the printed values, so the columns add up exactly
            lines.append(f"| {i + 1} | " + " | ".join(f"{x / 1e3:.3f}" for x in ms) + " |")
    finally:
        for name, fn in originals.items():
            setattr(fastread, name, fn)
    return "\n".join(lines)


WORKERS = {"save": worker_save, "restore": worker_restore, "numpy": worker_numpy, "memcpy": worker_memcpy}


# ----------------------------------------------------------------------------------------------
# Orchestration (the parent process runs dd and starts one subprocess per phase)


def run_dd(directory: Path, nbytes: int) -> dict[str, float]:
    """dd write (conv=fdatasync) of ``nbytes`` into ``directory``, then a cold dd read of it."""
    path, count = directory / "dd.bin", math.ceil(nbytes / MiB)
    benchlib.settle_memory(nbytes)
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fdatasync"],
                   check=True, capture_output=True)
    write_s = time.perf_counter() - t0
    benchlib.drop_caches(directory)
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    read_s = time.perf_counter() - t0
    path.unlink()
    return {"write_s": write_s, "read_cold_s": read_s, "bytes": count * MiB}


def run_json_worker(cmd: list[str], label: str) -> dict[str, Any]:
    """Run a worker subprocess; its last stdout line is its JSON result, else {"error": ...} with stderr's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(f"  {label} worker: {time.perf_counter() - t0:.0f}s wall")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"  {label} FAILED (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"error": f"rc {proc.returncode}: {tail.splitlines()[-1] if tail else ''}"}
    return json.loads(lines[-1])


def run_worker(phase: str, args: argparse.Namespace, directory: Path, variant: str = "") -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", phase, "--dir", str(directory),
           "--gb", str(args.gb), "--devices", str(args.devices), "--variant", variant or "jaxckpt",
           "--saves", str(args.saves)]
    return run_json_worker(cmd, f"{phase} {variant}")


def filesystem(directory: Path) -> str:
    out = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True).stdout.splitlines()
    dev, fstype, *_, mount = out[-1].split()
    return f"{fstype} ({dev} mounted on {mount})"


def run_all(args: argparse.Namespace, root: Path, nbytes: int) -> dict[str, list[dict[str, Any]]]:
    names = [v for v in args.variants.split(",") if v]
    results: dict[str, list[dict[str, Any]]] = {"dd": [], "numpy": [], **{v: [] for v in names}}
    for rep in range(args.reps):
        results["dd"].append(run_dd(root, nbytes))
        log(f"rep {rep + 1}: dd write {results['dd'][-1]['write_s']:.2f}s")
        if not args.no_numpy:
            results["numpy"].append(run_worker("numpy", args, root / f"numpy-{rep}"))
            shutil.rmtree(root / f"numpy-{rep}", ignore_errors=True)
            log(f"rep {rep + 1}: numpy {results['numpy'][-1].get('durable_s', float('nan')):.2f}s")
        for name in names:
            d = root / f"{name}-{rep}"
            row = run_worker("save", args, d, name)
            if "error" not in row:
                row.update(run_worker("restore", args, d, name))
            shutil.rmtree(d, ignore_errors=True)
            results[name].append(row)
            log(f"rep {rep + 1}: {name} " + ", ".join(
                f"{k} {row[k]:.2f}s" for k in ("blocking_s", "durable_s") if k in row))
        run_references(args, root, rep, results)
    return results


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# References beyond dd/np.save: a memcpy floor and PyTorch (benchmarks/torch_ckpt.py under --torch-python)

REFERENCES = ("dd", "numpy", "memcpy", "torch", "dcp")  # results keys that are not VARIANTS
TORCH_SCRIPT = Path(__file__).with_name("torch_ckpt.py")
TORCH_VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv-torch" / "bin" / "python"


def resolve_torch_python(choice: str | None) -> tuple[str | None, str]:
    """(interpreter for torch_ckpt.py or None, a note saying which and why)."""
    if choice and choice.lower() != "none":
        return choice, f"--torch-python {choice}"
    if choice:
        return None, "torch rows skipped (--torch-python none)"
    if TORCH_VENV_PYTHON.exists():
        return str(TORCH_VENV_PYTHON), f"{TORCH_VENV_PYTHON} (the repo's .venv-torch)"
    if importlib.util.find_spec("torch") is not None:
        return sys.executable, f"{sys.executable} (this interpreter has torch)"
    return None, ("torch rows skipped: no .venv-torch in the repo, no torch in this interpreter "
                  "and no --torch-python PATH")


def write_shapes(path: Path, abstract: PyTree) -> Path:
    """The JSON torch_ckpt.py builds its state from: [shape, dtype] per leaf, in jax.tree.leaves order."""
    path.write_text(json.dumps([[list(x.shape), np.dtype(x.dtype).name] for x in jax.tree.leaves(abstract)]))
    return path


def run_torch_worker(python: str, phase: str, directory: Path, shapes: Path) -> dict[str, Any]:
    cmd = [python, str(TORCH_SCRIPT), "--worker", phase, "--dir", str(directory), "--shapes", str(shapes)]
    return run_json_worker(cmd, f"torch {phase}")


def run_references(args: argparse.Namespace, root: Path, rep: int, results: dict[str, list[dict[str, Any]]]) -> None:
    """One repetition of the memcpy floor and, if an interpreter with torch was found, torch.save/load and DCP."""
    results.setdefault("memcpy", []).append(run_worker("memcpy", args, root / f"memcpy-{rep}"))
    if not args.torch_python:
        return
    shapes = root / "torch-shapes.json"
    if not shapes.exists():
        write_shapes(shapes, target(args.gb))
    for name, save, load in (("torch", "save", "restore"), ("dcp", "dcp-save", "dcp-load")):
        d = root / f"{name}-{rep}"
        row = run_torch_worker(args.torch_python, save, d, shapes)
        if "error" not in row:
            row.update(run_torch_worker(args.torch_python, load, d, shapes))
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d.with_name(d.name + "-warmup"), ignore_errors=True)
        results.setdefault(name, []).append(row)
        log(f"rep {rep + 1}: {name} " + ", ".join(
            f"{k} {row[k]:.2f}s" for k in ("blocking_s", "durable_s") if k in row))


def torch_save_rows(results: dict[str, list[dict[str, Any]]], gb: float, state_mb: float) -> list[str]:
    """Save-table rows for torch.save and DCP async_save, formatted as the variants' rows."""
    dd_s, lines = med(results["dd"], "write_s"), []
    for name, label in (("torch", "torch.save + fsync"), ("dcp", "DCP async_save")):
        rows = results.get(name, [])
        if not rows:
            continue
        lines.append(save_row(label, rows, gb, state_mb, dd_s, "-"))
    return lines


def torch_restore_rows(results: dict[str, list[dict[str, Any]]], gb: float, state_mb: float) -> list[str]:
    """Restore-table rows for torch.load and dcp.load (ok = every load's checksum equals the saved state's)."""
    lines = []
    for name, label in (("torch", "torch.load"), ("dcp", "dcp.load")):
        rows = [r for r in results.get(name, []) if "restore_warm" in r]
        if not rows:
            continue
        ok = all(math.isclose(r[k]["checksum"], r["checksum"], rel_tol=1e-12)
                 for r in rows for k in ("restore_first", "restore_cold", "restore_warm"))
        lines.append(restore_row(label, rows, gb, state_mb, ok, "-"))
    return lines


def memcpy_rows(results: dict[str, list[dict[str, Any]]], gb: float, state_mb: float) -> list[str]:
    """Restore-table reference rows: np.copyto of the state into fresh, then into touched memory."""
    rows = [r for r in results.get("memcpy", []) if "fresh" in r]
    if not rows:
        return []
    ok = "yes" if all(r["ok"] for r in rows) else "NO"
    base, lines = med(rows, "baseline_mb"), []
    labels = {"fresh": f"numpy memcpy into fresh buffers (floor: best of {MEMCPY_TRIALS})",
              "touched": f"numpy memcpy into touched buffers (best of {MEMCPY_TRIALS})"}
    first = {"fresh": num(statistics.median(r["fresh_trials_s"][0] for r in rows)), "touched": "-"}
    for key, label in labels.items():
        s, above = med(rows, key, "s"), med(rows, key, "peak_rss_mb") - base
        lines.append(f"| {label} | {s:.2f} | {s / gb:.2f} | {mark(s / gb <= 0.3)} | {med(rows, key, 'cpu_s'):.2f} "
                     f"| - | - | {first[key]} | - | {above / state_mb:.2f} | {ok} | - |")
    return lines


def torch_notes(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], gb: float) -> list[str]:
    """Report lines: which torch ran, DCP's defaults, blocking of DCP vs the jaxckpt variants; or why skipped."""
    rows = [r for name in ("torch", "dcp") for r in results.get(name, []) if "torch" in r]
    if not rows:
        return [f"torch: {getattr(args, 'torch_note', 'not run')}"]
    lines = [f"torch: {rows[0]['torch']} via {args.torch_note}; DCP single process without a process group, "
             f"async_save defaults: {json.dumps(rows[0].get('dcp_defaults'))} + the default stager (a blocking "
             "copy of the state into new CPU tensors before async_save returns)"]
    dcp_b = med(results.get("dcp", []), "blocking_s")
    for name in (n for n in results if n in VARIANTS):
        b = med(results[name], "blocking_s")
        lines.append(f"blocking: {name} {b / gb:.3f} s/GB vs DCP async_save {dcp_b / gb:.3f} s/GB "
                     f"(target ≤0.1 s/GB: {mark(b / gb <= 0.1)}; ≤DCP: {mark(b <= dcp_b)})")
    return lines


# ----------------------------------------------------------------------------------------------
# Report


def med(rows: list[dict[str, Any]], *keys: str) -> float:
    """Median over repetitions of ``row[k1][k2]...`` (NaN if missing)."""
    vals = []
    for row in rows:
        v: Any = row
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            vals.append(float(v))
    return statistics.median(vals) if vals else float("nan")


def num(x: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(x) else format(x, spec)


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


SAVE_HEAD = ("| variant | blocking s | s/GB | ≤0.1 s/GB | durable s | s/GB | GB/s | ×dd | ≥0.8×dd "
             "| of which fsync pass s | CPU s (save→durable) | dirty MB after wait | peak RSS ×state "
             "| above baseline ×state | disk MB | + jaxckpt CRC32 manifest s |")


def save_row(label: str, rows: list[dict[str, Any]], gb: float, state_mb: float, dd_s: float, manifest: str) -> str:
    """One save-table row (medians over ``rows``), or the first error if every repetition failed."""
    if all("error" in r for r in rows):
        return f"| {label} | error: {rows[0]['error'][:80]} |" + " |" * 14
    b, d = med(rows, "blocking_s"), med(rows, "durable_s")
    peak, before = med(rows, "peak_rss_mb"), med(rows, "baseline_mb")
    return (f"| {label} | {b:.3f} | {b / gb:.3f} | {mark(b / gb <= 0.1)} | {d:.2f} | {d / gb:.2f} | {gb / d:.2f} "
            f"| {dd_s / d:.2f} | {mark(dd_s / d >= 0.8)} | {med(rows, 'fsync_s'):.3f} | {med(rows, 'cpu_s'):.2f} "
            f"| {med(rows, 'dirty_after_wait_mb'):.0f} | {peak / state_mb:.2f} | {(peak - before) / state_mb:.2f} "
            f"| {med(rows, 'disk_bytes') / 1e6:.0f} | {manifest} |")


def restore_row(label: str, rows: list[dict[str, Any]], gb: float, state_mb: float, ok: bool, verify: str) -> str:
    """One restore-table row (medians over ``rows``)."""
    w, c = med(rows, "restore_warm", "s"), med(rows, "restore_cold", "s")
    peak, before = med(rows, "restore_first", "peak_rss_mb"), med(rows, "restore_baseline_mb")
    return (f"| {label} | {w:.2f} | {w / gb:.2f} | {mark(w / gb <= 0.3)} | {med(rows, 'restore_warm', 'cpu_s'):.2f} "
            f"| {c:.2f} | {c / gb:.2f} | {med(rows, 'restore_first', 's'):.2f} | {peak / state_mb:.2f} "
            f"| {(peak - before) / state_mb:.2f} | {'yes' if ok else 'NO'} | {verify} |")


def save_rows(results: dict[str, list[dict[str, Any]]], gb: float, state_mb: float) -> list[str]:
    dd_s = med(results["dd"], "write_s")
    lines = [SAVE_HEAD, "|" + "---|" * 16,
             f"| dd bs=1M conv=fdatasync | - | - | - | {dd_s:.2f} | {dd_s / gb:.2f} | {gb / dd_s:.2f} | 1.00 "
             "| - | - | - | - | - | - | - | - |"]
    if results["numpy"]:
        s = med(results["numpy"], "durable_s")
        peak, base = med(results["numpy"], "peak_rss_mb"), med(results["numpy"], "baseline_mb")
        lines.append(f"| np.save + fsync | - | - | - | {s:.2f} | {s / gb:.2f} | {gb / s:.2f} | {dd_s / s:.2f} "
                     f"| {mark(dd_s / s >= 0.8)} | - | - | - | {peak / state_mb:.2f} | {(peak - base) / state_mb:.2f} "
                     f"| {med(results['numpy'], 'disk_bytes') / 1e6:.0f} | - |")
    for name, rows in results.items():
        if name in REFERENCES:
            continue
        lines.append(save_row(name, rows, gb, state_mb, dd_s, num(med(rows, "manifest_s"))))
    lines += torch_save_rows(results, gb, state_mb)
    return lines


RESTORE_HEAD = ("| variant | warm s | s/GB | ≤0.3 s/GB | CPU s (warm) | cold s | s/GB | first in process s "
                "| peak RSS ×state (first) | above baseline ×state (first) | data + shardings ok "
                "| jaxckpt CRC32 verify cold / warm s |")


def restore_rows(results: dict[str, list[dict[str, Any]]], gb: float, state_mb: float) -> list[str]:
    dd_r = med(results["dd"], "read_cold_s")
    lines = [RESTORE_HEAD, "|" + "---|" * 12,
             f"| dd read (cold cache) | - | - | - | - | {dd_r:.2f} | {dd_r / gb:.2f} | - | - | - | - | - |"]
    if results["numpy"]:
        w, c = med(results["numpy"], "warm_s"), med(results["numpy"], "cold_s")
        peak = med(results["numpy"], "first_peak_rss_mb")
        lines.append(f"| np.load + device_put | {w:.2f} | {w / gb:.2f} | {mark(w / gb <= 0.3)} | - | {c:.2f} "
                     f"| {c / gb:.2f} | - | {peak / state_mb:.2f} | - | - | - |")
    lines += memcpy_rows(results, gb, state_mb)
    for name, rows in results.items():
        if name in REFERENCES or all("restore_warm" not in r for r in rows):
            continue
        ok = all(r[k]["shardings_ok"] and math.isclose(r[k]["checksum"], r["checksum"], rel_tol=1e-6)
                 and not r.get("verify_problems")
                 for r in rows if "restore_warm" in r for k in ("restore_first", "restore_cold", "restore_warm"))
        verify = f"{num(med(rows, 'verify_cold_s'))} / {num(med(rows, 'verify_warm_s'))}"
        lines.append(restore_row(name, rows, gb, state_mb, ok, verify))
    lines += torch_restore_rows(results, gb, state_mb)
    return lines


def later_saves_note(results: dict[str, list[dict[str, Any]]], gb: float) -> list[str]:
    """One line: the blocking of the saves after the first in each save process (``--saves``)."""
    parts = []
    for name, rows in results.items():
        later = [t for r in rows for t in r.get("later_blocking_s", [])]
        if later:
            parts.append(f"{name} median {statistics.median(later) / gb:.3f} s/GB "
                         f"({min(later):.3f}-{max(later):.3f} s, {len(later)} saves)")
    return ["saves 2 and later in the same process (new array objects each): " + "; ".join(parts)] if parts else []


def durable_pairs_note(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line: every writer's durable ×dd per repetition, against the ``dd`` run just before it.

    The table's ×dd divides two medians; this shows the spread they hide (the disk's speed drifts from one
    minute to the next on a shared host, README §1)."""
    dd_s, parts = [r["write_s"] for r in results["dd"]], []
    for name, rows in results.items():
        if name == "dd":
            continue
        pairs = [d / r["durable_s"] for d, r in zip(dd_s, rows, strict=False) if "durable_s" in r]
        if pairs:
            parts.append(f"{name} " + " ".join(f"{x:.2f}" for x in pairs))
    return ["durable ×dd per repetition (dd i / writer i): " + "; ".join(parts)] if parts else []


def warm_trials_note(results: dict[str, list[dict[str, Any]]]) -> str:
    """Every warm restore behind the table's medians, per variant and repetition."""
    labels = {"numpy": "np.load", "torch": "torch.load", "dcp": "dcp.load"}
    parts = []
    for name, rows in results.items():
        trials = [r.get("warm_trials_s") or r.get("restore_warm", {}).get("trials_s") for r in rows]
        if any(trials):
            reps = " | ".join(" ".join(f"{t:.2f}" for t in ts) for ts in trials if ts)
            parts.append(f"{labels.get(name, name)} {reps}")
    return (f"warm s = the median of {benchlib.WARM_TRIALS} warm restores in a row; every one, per repetition "
            f"(s): " + "; ".join(parts))


def report(args: argparse.Namespace, root: Path, nbytes: int, n_leaves: int,
           results: dict[str, list[dict[str, Any]]]) -> str:
    gb, state_mb = nbytes / 1e9, nbytes / MiB
    evict = {r.get("evict") for rows in results.values() for r in rows if r.get("evict")}
    lines = [
        f"state: {nbytes / 1e9:.3f} GB fp32 train state ({n_leaves} leaves; {model_config(args.gb)}), "
        f"sharded over {args.devices} CPU device(s); {args.reps} repetitions, medians shown",
        f"checkpoint dir: {root} on {filesystem(root)}; page-cache eviction for cold reads: {', '.join(evict)}",
        f"machine: {os.cpu_count()} CPUs, load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        *save_rows(results, gb, state_mb),
        *later_saves_note(results, gb),
        *durable_pairs_note(results),
        "",
        *restore_rows(results, gb, state_mb),
        warm_trials_note(results),
        "",
        "variants: " + "; ".join(f"{n} = {VARIANTS[n].about}" for n in results if n in VARIANTS),
        *torch_notes(args, results, gb),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="target state size in GB (default 1.0)")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices to shard the state over")
    p.add_argument("--reps", type=int, default=2, help="repetitions (medians are reported)")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the scratch checkpoint dir (default: the repo's parent directory)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--list-variants", action="store_true")
    p.add_argument("--no-numpy", action="store_true", help="skip the np.save reference")
    p.add_argument("--json", type=Path, help="also write the raw per-repetition numbers here")
    p.add_argument("--torch-python", default=None, metavar="PATH",
                   help="interpreter with torch for the torch.save/DCP rows (benchmarks/torch_ckpt.py); default: "
                        "the repo's .venv-torch/bin/python if it exists, else this one if it has torch; 'none' skips")
    p.add_argument("--saves", type=int, default=1, metavar="N",
                   help="saves per save process: the table times the first; saves 2..N (a training run's later "
                        "saves) get a line of their own")
    p.add_argument("--phases", type=int, default=0, metavar="N",
                   help="instead of the comparison: save once, then time fastread.restore's phases over N "
                        "restores in this process (restore 1 is the first in the process)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="jaxckpt", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0
    if args.list_variants:
        print("\n".join(f"{n:12s} {v.about}" for n, v in VARIANTS.items()))
        return 0
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; --list-variants shows them")
    if args.phases and fastread is None:
        raise SystemExit("--phases times jaxckpt.fastread, which this jaxckpt does not have")
    abstract = target(args.gb)
    nbytes, n_leaves = tree_bytes(abstract), len(jax.tree.leaves(abstract))
    parent = args.dir or Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="jaxckpt-bench-ckpt-", dir=parent))
    try:
        log(f"{nbytes / 1e9:.3f} GB state, scratch dir {root}")
        if args.phases:
            print(f"fastread.restore of a {nbytes / 1e9:.3f} GB state ({n_leaves} leaves) over {args.devices} "
                  f"device(s), {fastread.__file__}\n" + restore_phases(args, root, abstract))
            return 0
        args.torch_python, args.torch_note = resolve_torch_python(args.torch_python)
        log(f"torch: {args.torch_note}")
        results = run_all(args, root, nbytes)
        print(report(args, root, nbytes, n_leaves, results))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
