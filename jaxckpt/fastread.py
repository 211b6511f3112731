"""Fast restore of the ``state`` item jaxckpt writes: OCDBT + zarr3, uncompressed, into target shardings.

Orbax reads every shard through TensorStore into a fresh ``np.zeros`` buffer that sits 16 bytes off a
64-byte boundary, so the CPU client copies it once more in ``jax.device_put``; with its per-shard Python
bookkeeping that made a warm restore ~1.5 s/GB here, 3-4x slower than ``np.load`` (benchmarks/README.md).

This reader asks TensorStore's OCDBT ``dump`` where each chunk's bytes lie (file, offset, length), then
``preadv``s them from several threads straight into 64-byte-aligned buffers that ``jax.device_put`` on
the CPU aliases without a copy. The files are the same ones Orbax wrote and any Orbax reads. Anything
this reader does not recognise (compression, other codecs, several B-tree levels, a dtype or shape that
differs from the target) raises :class:`Unsupported`, and the caller falls back to Orbax.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

PyTree = Any
Slices = tuple[slice, ...]
_NO_CHUNK = 2**64 - 1  # sharding_indexed: an inner chunk that was never written
_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}


class Unsupported(Exception):
    """The checkpoint is valid Orbax, but not in the layout this reader handles; use Orbax."""


@dataclass(frozen=True)
class Extent:
    """Where a stored value lies: ``length`` bytes at ``offset`` of ``path`` (or ``inline`` bytes)."""

    path: Path | None
    offset: int
    length: int
    inline: bytes | None = None


@dataclass(frozen=True)
class StoredArray:
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    sharded: bool  # chunks wrapped in zarr3's sharding_indexed codec (one inner chunk each)
    fill_value: Any


# -- the OCDBT key -> extent table ------------------------------------------------------------------------


def _extent(item_dir: Path, entry: dict[str, Any], files: dict[tuple[str, str], Path]) -> Extent:
    if "inline_value" in entry:
        value = entry["inline_value"]
        return Extent(None, 0, len(value), bytes(value))
    kind, base, rel, offset, length = entry["indirect_value"].split(":")
    if kind != "value":
        raise Unsupported(f"unexpected OCDBT value reference {entry['indirect_value']!r}")
    path = files.get((base, rel))  # one Path per data file (8 devices, 1 GB: 1,649 values; 0.06 -> 0.02 s)
    if path is None:
        path = files[base, rel] = item_dir / base / rel
    return Extent(path, int(offset), int(length))


def _key(entry: dict[str, Any]) -> str:
    key = entry["key"]
    return key.decode() if isinstance(key, bytes) else str(key)


def read_index(item_dir: Path) -> dict[str, Extent]:
    """Every key of the item's OCDBT database (its newest version) and where its value lies."""
    base = ts.KvStore.open(f"file://{item_dir.absolute()}/").result()
    manifest = ts.ocdbt.dump(base).result()
    if manifest.get("version_tree_nodes"):
        raise Unsupported("OCDBT version tree has interior nodes")
    version = manifest["versions"][-1]
    root = version["root"].get("location")
    if root is None:
        return {}
    if version.get("root_height", 0) != 0:
        raise Unsupported(f"OCDBT B-tree of height {version['root_height']}")
    node = ts.ocdbt.dump(base, root).result()
    if node.get("height", 0) != 0 or node.get("key_prefix"):
        raise Unsupported("OCDBT B-tree node with a key prefix or children")
    files: dict[tuple[str, str], Path] = {}
    return {_key(e): _extent(item_dir, e, files) for e in node["entries"]}


# -- zarr3 array metadata ----------------------------------------------------------------------------------


def _read_extent(extent: Extent) -> bytes:
    if extent.inline is not None:
        return extent.inline
    with open(extent.path, "rb") as f:
        return os.pread(f.fileno(), extent.length, extent.offset)


def parse_zarr(meta: dict[str, Any]) -> StoredArray:
    """The array's layout, if it is one this reader handles: regular chunks, raw little-endian bytes."""
    grid = meta.get("chunk_grid", {})
    if meta.get("zarr_format") != 3 or grid.get("name") != "regular":
        raise Unsupported("not a zarr3 array with a regular chunk grid")
    if meta.get("chunk_key_encoding") != {"name": "default"}:
        raise Unsupported(f"chunk key encoding {meta.get('chunk_key_encoding')}")
    chunk = tuple(grid["configuration"]["chunk_shape"])
    codecs, sharded = meta.get("codecs", []), False
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        cfg = codecs[0]["configuration"]
        if tuple(cfg["chunk_shape"]) != chunk or cfg.get("index_location", "end") != "end":
            raise Unsupported("sharding_indexed with several inner chunks")
        if cfg["index_codecs"] != [_BYTES_LE, {"name": "crc32c"}]:
            raise Unsupported(f"shard index codecs {cfg['index_codecs']}")
        codecs, sharded = cfg["codecs"], True
    if codecs != [_BYTES_LE] and not (codecs == [{"name": "bytes"}] and not chunk):
        raise Unsupported(f"codecs {codecs} (compressed or transposed)")
    try:
        dtype = np.dtype(jax.numpy.dtype(meta["data_type"]))
    except TypeError as e:
        raise Unsupported(f"data type {meta['data_type']}") from e
    return StoredArray(tuple(meta["shape"]), chunk, dtype, sharded, meta.get("fill_value", 0))


# -- reading one target shard ------------------------------------------------------------------------------


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary (the CPU client aliases those)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _padded(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


class Arena:
    """One host allocation, carved into 64-byte-aligned arrays, for every shard of one restore.

    It starts on a 2 MiB boundary, so the huge pages numpy asks for on large allocations cover all of it,
    not only the middle of each shard's own allocation (8 fake devices: 1,423 shards for 1 GB, most of them
    under numpy's 4 MiB threshold). Paired runs on the benchmark VM (benchmarks/README.md, §1): a repeated
    restore of 4 GB 1.9-2.1 s -> 1.1-1.2 s, cold 5.8-6.3 s -> 4.4-5.0 s; the first restore in a process
    (page cache warm) did not change at 4 GB and got slower at 1 GB (0.75 -> 0.9 s), because that VM
    backs memory a process touches for the first time at a cost that is highest for huge pages.
    The arrays are views: the allocation is freed with the last of them.
    """

    _HUGE = 2 << 20

    def __init__(self, nbytes: int):
        self._raw = np.empty(nbytes + self._HUGE, np.uint8)
        self._next = -self._raw.ctypes.data % self._HUGE
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            start, self._next = self._next, self._next + _padded(nbytes)
        if start + nbytes > len(self._raw):
            raise ValueError(f"arena of {len(self._raw)} bytes cannot hold {start + nbytes}")
        return self._raw[start : start + nbytes].view(dtype).reshape(shape)


def _preadv_full(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` from ``offset`` on, one ``preadv`` in the usual case."""
    n = os.preadv(fd, views, offset)
    for view in views:
        done, n = min(n, len(view)), max(0, n - len(view))
        while done < len(view):  # a short read: finish this view piece by piece
            k = os.preadv(fd, [view[done:]], offset + done)
            if k <= 0:
                raise Unsupported(f"file ends before offset {offset + done}")
            done += k
        offset += len(view)


def _bytes_of(out: np.ndarray) -> memoryview:
    return memoryview(out.reshape(-1).view(np.uint8))


class ArrayReader:
    """Reads any box of one stored array into a fresh aligned host array."""

    def __init__(self, name: str, arr: StoredArray, index: dict[str, Extent], fds: dict[Path, int]):
        self.name, self.arr, self.index, self.fds = name, arr, index, fds
        self.chunk_bytes = math.prod(arr.chunk_shape) * arr.dtype.itemsize

    def _key(self, coord: tuple[int, ...]) -> str:
        return f"{self.name}/c/" + "/".join(map(str, coord)) if coord else f"{self.name}/c"

    def _coords(self, box: Slices) -> Iterator[tuple[int, ...]]:
        """Grid coordinates of the chunks that overlap ``box``."""
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(box, self.arr.chunk_shape, strict=True)]
        return itertools.product(*ranges)

    def first_extent(self, box: Slices) -> tuple[str, int]:
        """Where reading ``box`` starts on disk (to read files front to back)."""
        corner = tuple(s.start // c for s, c in zip(box, self.arr.chunk_shape, strict=True))
        extent = self.index.get(self._key(corner))
        return (str(extent.path), extent.offset) if extent is not None and extent.path else ("", 0)

    def _whole_chunk(self, box: Slices) -> tuple[int, ...] | None:
        """The grid coordinate of the chunk ``box`` is, if it is exactly one (a shard of the saving mesh)."""
        coord = []
        for s, c in zip(box, self.arr.chunk_shape, strict=True):
            if s.start % c or s.stop - s.start != c:
                return None
            coord.append(s.start // c)
        return tuple(coord)

    def _where(self, extent: Extent, tail: bytes) -> tuple[int, int] | None:
        """(start, length) of the raw chunk inside its value, from the shard index; None if never written."""
        start, length = struct.unpack("<QQ", tail[:16]) if self.arr.sharded else (0, extent.length)
        if start == _NO_CHUNK:
            return None
        if length != self.chunk_bytes or start + length > extent.length:
            raise Unsupported(f"{self.name}: a chunk holds {length} bytes, expected {self.chunk_bytes}")
        return start, length

    def _read_chunk(self, extent: Extent, out: np.ndarray) -> bool:
        """Fill ``out`` with the chunk's bytes; False if it was never written (fill value)."""
        if extent.inline is not None:
            where = self._where(extent, extent.inline[-20:])
            if where is not None:
                _bytes_of(out)[:] = extent.inline[where[0] : where[0] + where[1]]
            return where is not None
        fd = self.fds[extent.path]
        if self.arr.sharded and extent.length == self.chunk_bytes + 20:  # data, then its index: one read
            tail = bytearray(20)
            _preadv_full(fd, [_bytes_of(out), memoryview(tail)], extent.offset)
            if self._where(extent, bytes(tail)) == (0, self.chunk_bytes):
                return True
        tail = os.pread(fd, 20, extent.offset + extent.length - 20) if self.arr.sharded else b""
        where = self._where(extent, tail)
        if where is not None:
            _preadv_full(fd, [_bytes_of(out)], extent.offset + where[0])
        return where is not None

    def _fill_chunk(self, coord: tuple[int, ...], out: np.ndarray) -> None:
        """``out`` (one whole chunk, contiguous) filled with chunk ``coord``, or the fill value if never written."""
        extent = self.index.get(self._key(coord))
        if extent is None or not self._read_chunk(extent, out):
            out[...] = np.asarray(self.arr.fill_value or 0).astype(self.arr.dtype)

    def read(self, box: Slices, out: np.ndarray) -> None:
        """Fill ``out`` (the shape of ``box``) with that box of the stored array."""
        arr, coord = self.arr, self._whole_chunk(box)
        if coord is not None and out.flags.c_contiguous:  # the usual case: skip the overlap arithmetic below
            self._fill_chunk(coord, out)
            return
        for coord in self._coords(box):
            lo = [c * k for c, k in zip(coord, arr.chunk_shape, strict=True)]
            part = tuple(slice(max(s.start, a), min(s.stop, a + k)) for s, a, k in zip(box, lo, arr.chunk_shape,
                                                                                       strict=True))
            dst = out[(*(slice(p.start - s.start, p.stop - s.start) for p, s in zip(part, box, strict=True)), ...)]
            whole = dst if dst.shape == arr.chunk_shape and dst.flags.c_contiguous else aligned_empty(
                arr.chunk_shape, arr.dtype)  # the target shard cuts this chunk (another mesh): keep the overlap
            self._fill_chunk(coord, whole)
            if whole is not dst:
                dst[...] = whole[(*(slice(p.start - a, p.stop - a) for p, a in zip(part, lo, strict=True)), ...)]


# -- the whole tree ------------------------------------------------------------------------------------------


def _stored(index: dict[str, Extent], name: str, target: Any) -> StoredArray:
    meta_extent = index.get(f"{name}/zarr.json")
    if meta_extent is None:
        raise Unsupported(f"no array {name!r} in the checkpoint")
    arr = parse_zarr(json.loads(_read_extent(meta_extent)))
    if arr.shape != tuple(target.shape) or arr.dtype != np.dtype(target.dtype):
        raise Unsupported(f"{name}: stored {arr.dtype}{list(arr.shape)}, target {target.dtype}{list(target.shape)}")
    if getattr(target, "sharding", None) is None:
        raise Unsupported(f"{name}: target has no sharding")
    return arr


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Slices:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _boxes(target: Any) -> tuple[Slices, ...]:
    """The boxes of the array that this process's devices hold, each once (replicas hold the same box)."""
    return _boxes_of(target.sharding, tuple(target.shape))


@functools.lru_cache(maxsize=1024)
def _boxes_of(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[Slices, ...]:
    """:func:`_boxes`, once per sharding and shape: a model's layers repeat a few."""
    indices = sharding.addressable_devices_indices_map(shape).values()
    return tuple(dict.fromkeys(_box(index, shape) for index in indices))


def _box_shape(box: Slices) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def _arena_bytes(jobs: list[tuple[ArrayReader, Slices]]) -> int:
    """Bytes of every box this process will hold (one buffer per box, shared by its devices), 64-byte aligned."""
    return sum(_padded(math.prod(_box_shape(box)) * r.arr.dtype.itemsize) for r, box in jobs)


def _to_devices(targets: list[Any], boxes: list[tuple[Slices, ...]], hosts: list[np.ndarray]) -> list:
    """Every leaf as a jax.Array in its target sharding, made from the host boxes without a copy: one
    ``jax.make_array_from_callback`` (one batched transfer call) per leaf.

    The CPU client aliases each aligned box, and the devices that hold the same box (replicas) share its
    buffer, as ``jax.device_put`` of a numpy array does. That is safe because XLA never donates a buffer that
    aliases host memory: a donating step writes its output elsewhere (``tests/test_fastread.py`` checks it).
    8 fake devices, 1 GB: 0.02-0.04 s, against 0.035-0.05 s when each replica got its own copy through a
    batched ``jax.device_put``, and 0.09-0.16 s for a ``device_put`` of every shard.
    """
    it = iter(hosts)
    leaves = []
    for target, leaf_boxes in zip(targets, boxes, strict=True):
        shape, by_box = tuple(target.shape), {box: next(it) for box in leaf_boxes}
        leaves.append(jax.make_array_from_callback(shape, target.sharding,
                                                   lambda index, b=by_box, n=shape: b[_box(index, n)]))
    return leaves


def _prefetch(fds: dict[Path, int]) -> None:
    """Ask the kernel to read the files ahead (in order) when they fit in memory: a cold restore then
    streams from disk while the threads copy, instead of waiting on one read at a time."""
    total = sum(os.fstat(fd).st_size for fd in fds.values())
    if total < _available_memory() // 2:
        for fd in fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _runs(order: list[int], outs: list[np.ndarray], threads: int) -> list[list[int]]:
    """``order`` cut into consecutive runs that close once they hold 32 MiB (or 1/4 of a thread's share of a
    small state, at least 1 MiB).

    One thread-pool task per run, not per job: with 1,423 shards (8 fake devices, 1 GB), a task per shard
    read in 0.29-0.35 s, runs of 32 MiB mostly in 0.21-0.33 s (``benchmarks/checkpoint.py --devices 8
    --phases 6``).
    """
    target = max(1 << 20, min(32 << 20, sum(o.nbytes for o in outs) // (4 * threads)))
    runs, size = [[]], 0
    for i in order:
        if size >= target:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += outs[i].nbytes
    return runs


def _read_all(jobs: list[tuple[ArrayReader, Slices]], arena: Arena, threads: int) -> list[np.ndarray]:
    """Every job's box, read into ``arena`` on ``threads`` threads in on-disk order (files front to back)."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].first_extent(jobs[i][1]))
    outs = [arena.take(_box_shape(box), r.arr.dtype) for r, box in jobs]

    def read(run: list[int]) -> None:
        for i in run:
            jobs[i][0].read(jobs[i][1], outs[i])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, _runs(order, outs, threads)))
    return outs


def restore(item_dir: Path, abstract: PyTree, threads: int | None = None) -> PyTree:
    """The tree ``abstract`` (ShapeDtypeStructs with shardings) read from ``item_dir`` (a ``state`` item)."""
    index = read_index(Path(item_dir))
    targets, treedef = jax.tree.flatten(abstract)
    names = jax.tree.leaves(ocp.tree.get_param_names(abstract, include_empty_nodes=False))
    if len(names) != len(targets):
        raise Unsupported("tree has leaves Orbax does not name")
    stored = [_stored(index, n, t) for n, t in zip(names, targets, strict=True)]
    paths = {e.path for e in index.values() if e.path is not None}
    fds = {p: os.open(p, os.O_RDONLY) for p in sorted(paths)}
    try:
        _prefetch(fds)
        readers = [ArrayReader(n, a, index, fds) for n, a in zip(names, stored, strict=True)]
        boxes = [_boxes(t) for t in targets]
        jobs = [(r, box) for r, b in zip(readers, boxes, strict=True) for box in b]
        arena = Arena(_arena_bytes(jobs))
        hosts = _read_all(jobs, arena, threads or min(8, os.cpu_count() or 1))
    finally:
        for fd in fds.values():
            os.close(fd)
    leaves = _to_devices(targets, boxes, hosts)
    return jax.tree.unflatten(treedef, leaves)
