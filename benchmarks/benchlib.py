"""What the benchmark scripts share: OS measurements, the noise that fills benchmark states, the dataset.

Standard library + numpy only at import time, so ``torch_ckpt.py`` can use it under an interpreter that has
neither jax nor jaxckpt. Scripts run as files (``benchmarks/`` is then ``sys.path[0]``) and import it as
``benchlib``; imported as ``benchmarks.<name>`` from the repo root, they take ``benchmarks.benchlib``.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MiB = 2**20
WARM_TRIALS = 3  # warm restores per repetition in every restore benchmark; the median one is reported
# The text the throughput benchmarks train on: $JAXCKPT_BENCH_TEXT, else ../shared/data beside the checkout; if
# neither exists, dataset() returns '' and the trainer prepares its default corpus instead.
SHAKESPEARE = Path(os.environ.get("JAXCKPT_BENCH_TEXT")
                   or Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")


# -- memory and page cache ---------------------------------------------------------------------


SETTLE_S = 10.0
BACKED_FACTOR = 2.5  # memory each timed writer finds freed just before, as a multiple of the bytes it writes


def settle_memory(write_bytes: int) -> None:
    """Put every timed writer in the same memory state: ``SETTLE_S`` idle, then ``BACKED_FACTOR`` times the
    bytes it is about to write touched and freed, so that its page cache (and any copy it stages) comes out
    of memory the host backs.

    On the benchmark VM a write into page-cache memory the host took back costs several times more than into
    memory freed just before (README §1d): a 1 GB ``dd`` took 0.5-0.8 s 0-3 s after another one was deleted,
    1.4-1.8 s 8-30 s after. Idle time alone did not make the writers equal (README §1, eleventh session): the
    VM hands free memory back in 8 MiB blocks, a share of it per pass, and after 10 s idle ``dd`` still found
    backed pages in some repetitions, while a save worker had spent what it found on building its state.
    Freed just before, every writer finds backed memory, and the ratios compare writers at the disk's speed.
    """
    time.sleep(SETTLE_S)
    backed = np.ones(int(write_bytes * BACKED_FACTOR) // 8)  # np.ones writes every page (np.zeros would not)
    del backed  # unmapped: its pages go back to the kernel's free lists, not yet to the host
    release_allocator_memory()  # under TCMalloc the del above kept them in the process


def release_allocator_memory() -> bool:
    """Hand the kernel what the allocator keeps after a free; False where it keeps nothing (glibc).

    Under TCMalloc (as the jaxckpt command runs, jaxckpt/malloc.py, with ``TCMALLOC_RELEASE_RATE=0``) freed
    memory stays in the process. There :func:`settle_memory` settled nothing: a 4 GB save's copy into the
    page cache then took 4.3-6.3 CPU-s instead of 1.0-1.2 (README §1e, twenty-seventh session). The same as
    jaxckpt.malloc.release_free_memory, without importing jaxckpt (torch_ckpt.py runs without it)."""
    release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)  # TCMalloc's, if loaded
    if release is None:
        return False
    release()
    return True


def reset_peak_rss() -> None:
    """Start a phase's peak RSS from now. Under TCMalloc freed memory stays resident until released, so it is
    released first (:func:`release_allocator_memory`), as the trainer does after start-up."""
    release_allocator_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dirty_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """``fn``, appending the wall seconds of each call to ``spent`` (to time a library function in place)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    return wrapper


def median_trial(run: Callable[[], dict[str, Any]], trials: int = WARM_TRIALS) -> dict[str, Any]:
    """``run()`` ``trials`` times in a row; the result whose ``"s"`` is the median, plus every trial's seconds.

    One warm restore right after a cold one varies by up to 2x on this VM (memory freed by the previous
    restore is handed back to the host and must be backed again), so a single sample says little.
    """
    results = [run() for _ in range(trials)]
    median = statistics.median_low([r["s"] for r in results])
    return {**next(r for r in results if r["s"] == median), "trials_s": [r["s"] for r in results]}


def drop_caches(root: Path) -> str:
    """Evict ``root``'s files from the page cache; returns the method that worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError:
        for dirpath, _, files in os.walk(root):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


# -- files -------------------------------------------------------------------------------------


def fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, then ``root``'s parent."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath, name))
        fsync_dir(Path(dirpath))
    fsync_dir(root.parent)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- benchmark states and data -----------------------------------------------------------------


def noise_block() -> np.ndarray:
    """64 MiB of N(0, 0.02) float32: longer than any zstd window, so compression cannot cheat."""
    return np.random.default_rng(0).normal(0.0, 0.02, 16 * MiB).astype(np.float32)


def fill_leaf(i: int, host: np.ndarray, block: np.ndarray) -> None:
    """Tile (float) leaf ``i`` from ``block``, starting at a leaf-dependent offset."""
    flat, start, lo = host.reshape(-1), (i * 7919) % block.size, 0
    while lo < flat.size:  # np.resize is ~10x slower than these slice copies
        n = min(block.size - start, flat.size - lo)
        flat[lo : lo + n] = block[start : start + n]
        lo, start = lo + n, 0


def dataset(tmp: Path) -> str:
    """A prepared tinyshakespeare dataset in ``tmp`` if the text exists, else '' (default corpus)."""
    if not SHAKESPEARE.is_file():
        return ""
    from jaxckpt.data import prepare  # here, not at the top: torch_ckpt.py imports this module without jax

    out = tmp / "shakespeare"
    prepare([SHAKESPEARE], out, force=True)
    return str(out)
