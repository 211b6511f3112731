"""PyTorch reference rows for benchmarks/checkpoint.py: the same bytes through torch.save/load and DCP.

    <torch-python> benchmarks/torch_ckpt.py --worker save      --dir D --shapes shapes.json
    <torch-python> benchmarks/torch_ckpt.py --worker restore   --dir D --shapes shapes.json
    <torch-python> benchmarks/torch_ckpt.py --worker dcp-save  --dir D --shapes shapes.json
    <torch-python> benchmarks/torch_ckpt.py --worker dcp-load  --dir D --shapes shapes.json

Standalone: imports torch, numpy and benchlib.py only (no jax/jaxckpt), so it runs under a separate interpreter
(``.venv-torch``: Python 3.11 + a CPU torch wheel). ``benchmarks/checkpoint.py`` writes ``shapes.json`` -- a JSON
list of ``[shape, dtype]``, one per leaf of its train state in ``jax.tree.leaves`` order -- starts one process
per phase (so peak RSS is separable) and reads the JSON line each prints last. The state is a flat
``{"leaf0000": tensor, ...}`` dict filled exactly as checkpoint.py's ``build_state`` fills its leaves (float
leaves tiled from one 64 MiB block of N(0, 0.02), integer leaves zero), so both benchmarks write the same bytes.

save: ``torch.save(state, path)``; *blocking* = until it returns, *durable* = + fsync of the file, its dir and
the parent. dcp-save: ``torch.distributed.checkpoint.async_save(state, checkpoint_id=dir)`` with every setting
at its default, in a single process without ``init_process_group`` (DCP then saves with ``no_dist``);
*blocking* = until it returns its future, *durable* = until ``future.result()`` + the same fsync pass.
restore / dcp-load: a first load (page cache warm from the save), a cold one (after ``echo 3 > drop_caches``,
else ``posix_fadvise(DONTNEED)`` per file), then ``benchlib.WARM_TRIALS`` warm ones (the median is reported).
``torch.load`` allocates its own tensors; ``dcp.load`` loads in place, so the timed region includes allocating
its (never touched) ``torch.empty`` destinations.
Peak RSS = VmHWM, reset through ``/proc/self/clear_refs`` just before each timed phase.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

try:  # run as a file (benchmarks/ is sys.path[0]), or imported as benchmarks.<name> from the repo root
    import benchlib
except ImportError:
    from benchmarks import benchlib

State = dict[str, torch.Tensor]
Shapes = list[tuple[tuple[int, ...], np.dtype]]

# DCP warns on every call that it assumes a single process (no process group): expected here.
warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")

# ----------------------------------------------------------------------------------------------
# The state


def load_shapes(path: Path) -> Shapes:
    return [(tuple(shape), np.dtype(dtype)) for shape, dtype in json.loads(path.read_text())]


def key(i: int) -> str:
    return f"leaf{i:04d}"


def build_state(shapes: Shapes) -> State:
    """checkpoint.py's ``build_state`` bytes as CPU tensors: float leaves tiled from a 64 MiB N(0, 0.02) block."""
    block = benchlib.noise_block()
    state: State = {}
    for i, (shape, dtype) in enumerate(shapes):
        host = np.zeros(shape, dtype)
        if np.issubdtype(dtype, np.floating):
            benchlib.fill_leaf(i, host, block)
        state[key(i)] = torch.from_numpy(host)
    return state


def empty_state(shapes: Shapes) -> State:
    """Fresh, never-touched destination tensors for ``dcp.load`` (it loads in place)."""
    return {key(i): torch.empty(shape, dtype=torch_dtype(dtype)) for i, (shape, dtype) in enumerate(shapes)}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def checksum(state: State) -> float:
    """Sum of |x| over every element (float64 accumulation): equal for equal bytes."""
    return float(sum(np.abs(t.numpy().astype(np.float32, copy=False)).sum(dtype=np.float64) for t in state.values()))


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def dcp_defaults() -> dict[str, Any]:
    """What ``dcp.async_save`` does when every argument is left at its default (recorded with the results)."""
    params = inspect.signature(dcp.async_save).parameters
    writer = inspect.signature(dcp.FileSystemWriter.__init__).parameters
    kind = params["async_checkpointer_type"].default
    return {"async_checkpointer_type": getattr(kind, "value", str(kind)),
            "writer": {k: writer[k].default for k in ("single_file_per_rank", "sync_files", "thread_count")
                       if k in writer}}


def warm_up(scratch: Path) -> None:
    """One tiny save + load of each kind so one-off initialisation (imports, thread pools) is not timed."""
    tiny = {"a": torch.ones(64)}
    scratch.mkdir(parents=True, exist_ok=True)
    torch.save(tiny, scratch / "tiny.pt")
    torch.load(scratch / "tiny.pt", weights_only=True)
    result(dcp.async_save(tiny, checkpoint_id=str(scratch / "dcp")))
    dcp.load({"a": torch.empty(64)}, checkpoint_id=str(scratch / "dcp"))
    shutil.rmtree(scratch, ignore_errors=True)


def result(future: Any) -> Any:
    """Wait for ``async_save``'s return value: a Future, or an AsyncSaveResponse (staging + upload futures)."""
    return getattr(future, "upload_completion", future).result()


def timed_save(directory: Path, shapes: Shapes, save: Callable[[State], Any], wait: Callable[[Any], Any],
               target: Path) -> dict[str, Any]:
    """Build the state, then time ``save`` (blocking), ``wait`` (done) and an fsync pass of ``target`` (durable)."""
    warm_up(directory.with_name(directory.name + "-warmup"))
    baseline = benchlib.proc_status_mb("VmRSS")  # runtime + imports, before the state exists
    state = build_state(shapes)
    out: dict[str, Any] = {"state_bytes": state_bytes(state), "baseline_mb": baseline,
                           "torch": torch.__version__, "dcp_defaults": dcp_defaults()}
    directory.mkdir(parents=True, exist_ok=True)
    gc.collect()
    benchlib.settle_memory(out["state_bytes"])
    benchlib.reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    handle = save(state)
    t1 = time.perf_counter()
    wait(handle)
    t2 = time.perf_counter()
    out["dirty_after_wait_mb"] = benchlib.dirty_mb()
    benchlib.fsync_tree(target)
    t3, out["cpu_s"] = time.perf_counter(), time.process_time() - c0
    out["peak_rss_mb"] = benchlib.proc_status_mb("VmHWM")
    out["checksum"] = checksum(state)  # after the peak, as benchmarks/checkpoint.py's save worker does
    out.update(blocking_s=t1 - t0, wait_s=t2 - t0, fsync_s=t3 - t2, durable_s=t3 - t0,
               disk_bytes=benchlib.dir_bytes(target))
    return out


def timed_load(load: Callable[[], State]) -> dict[str, Any]:
    gc.collect()
    benchlib.reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    state = load()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"s": dt, "cpu_s": cpu, "peak_rss_mb": benchlib.proc_status_mb("VmHWM"), "checksum": checksum(state)}
    del state
    gc.collect()
    return out


def timed_loads(directory: Path, load: Callable[[], State]) -> dict[str, Any]:
    """First, cold and warm loads (the warm one: median of 3); peak RSS is clean for the first only."""
    warm_up(directory.with_name(directory.name + "-warmup"))
    baseline = benchlib.proc_status_mb("VmRSS")
    first = timed_load(load)
    method = benchlib.drop_caches(directory)
    cold = timed_load(load)
    warm = benchlib.median_trial(lambda: timed_load(load))
    return {"restore_first": first, "restore_cold": cold, "restore_warm": warm, "evict": method,
            "restore_baseline_mb": baseline, "torch": torch.__version__}


def worker_save(args: argparse.Namespace) -> dict[str, Any]:
    """torch.save of the whole dict into one file; durable after the fsync pass (torch.save does not fsync)."""
    path = args.dir / "state.pt"
    return timed_save(args.dir, load_shapes(args.shapes), lambda s: torch.save(s, path), lambda _: None, args.dir)


def worker_restore(args: argparse.Namespace) -> dict[str, Any]:
    path = args.dir / "state.pt"
    return timed_loads(args.dir, lambda: torch.load(path, weights_only=True))


def worker_dcp_save(args: argparse.Namespace) -> dict[str, Any]:
    """dcp.async_save with its defaults; the fsync pass covers what FileSystemWriter(sync_files=True) leaves."""
    ckpt = args.dir / "dcp"
    return timed_save(args.dir, load_shapes(args.shapes), lambda s: dcp.async_save(s, checkpoint_id=str(ckpt)),
                      result, ckpt)


def worker_dcp_load(args: argparse.Namespace) -> dict[str, Any]:
    ckpt, shapes = args.dir / "dcp", load_shapes(args.shapes)

    def load() -> State:
        state = empty_state(shapes)
        dcp.load(state, checkpoint_id=str(ckpt))
        return state

    return timed_loads(ckpt, load)


WORKERS = {"save": worker_save, "restore": worker_restore, "dcp-save": worker_dcp_save, "dcp-load": worker_dcp_load}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=sorted(WORKERS), required=True)
    p.add_argument("--dir", type=Path, required=True, help="checkpoint directory (created by the save phases)")
    p.add_argument("--shapes", type=Path, required=True, help="JSON list of [shape, dtype], one per leaf")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(WORKERS[args.worker](args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
