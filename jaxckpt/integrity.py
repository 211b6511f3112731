"""Checksums that make a checkpoint trustworthy: written once its bytes are durable, checked on resume.

A step directory is *complete* only when it holds ``MANIFEST``: every file's size and CRC32,
written (and fsynced) after all files and directories of the step were fsynced. Orbax alone
restores flipped bytes silently (DESIGN.md §4); the manifest catches them.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "jaxckpt_manifest.json"


def _crc32(path: Path) -> int:
    """CRC32 of a file, computed over a read-only mapping of it: no read buffers to allocate and fault in."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            return zlib.crc32(view)  # releases the GIL: verify() checks files on several threads


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, and ``root``'s parent (the rename)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)
    fsync_dir(root.parent)


def write_manifest(step_dir: Path) -> int:
    """Make the step's files durable, then record their sizes and CRC32s; returns bytes covered."""
    step_dir = Path(step_dir)
    fsync_tree(step_dir)
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "crc32": _crc32(p)} for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    fsync_dir(step_dir)
    return sum(v["size"] for v in files.values())


def has_manifest(step_dir: Path) -> bool:
    return (Path(step_dir) / MANIFEST).is_file()


def verify(step_dir: Path) -> list[str]:
    """Problems found in a step directory (empty list = every byte matches its manifest)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir}: missing"]
    if not has_manifest(step_dir):
        return [f"{step_dir}: no {MANIFEST} (the save never completed, e.g. the process died while committing)"]
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as e:
        return [f"{step_dir / MANIFEST}: unreadable ({e})"]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda item: _check_file(step_dir / item[0], item[1]), sorted(files.items()))
        return [problem for problem in found if problem]


def _check_file(path: Path, want: dict[str, int]) -> str | None:
    if not path.is_file():
        return f"{path}: missing"
    if path.stat().st_size != want["size"]:
        return f"{path}: size {path.stat().st_size} bytes, expected {want['size']} (truncated or extended)"
    if _crc32(path) != want["crc32"]:
        return f"{path}: checksum mismatch (bytes changed after the save)"
    return None
