"""The checksum manifest: what it records, and the checksums taken while a save is still being written."""

from __future__ import annotations

import json
import mmap
import os
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxckpt import integrity
from jaxckpt.checkpoint import Checkpointer
from jaxckpt.config import CheckpointConfig


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def a_step(root: Path) -> dict[str, bytes]:
    files = {"state/d/aa": os.urandom(300_000), "state/d/bb": os.urandom(70_000), "meta/metadata": b"{}",
             "state/empty": b""}
    for name, data in files.items():
        write(root / name, data)
    return files


class FixedIterator:
    """The data iterator a Checkpointer saves beside the state, at a position that never moves."""

    def get_state(self) -> bytes:
        return b"{}"


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[integrity.EarlyChecksums]:
    """Every EarlyChecksums started while the test runs, in order."""
    started: list[integrity.EarlyChecksums] = []

    class Recorded(integrity.EarlyChecksums):
        def start(self) -> integrity.EarlyChecksums:
            started.append(self)
            return super().start()

    monkeypatch.setattr(integrity, "EarlyChecksums", Recorded)
    return started


def manifest_of(step_dir: Path) -> dict[str, dict[str, int]]:
    return json.loads((step_dir / integrity.MANIFEST).read_text())["files"]


def test_manifest_records_each_file_and_verify_finds_a_flipped_byte(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integrity, "CRC_WINDOW", 3 * mmap.ALLOCATIONGRANULARITY)  # files span several windows
    files = a_step(tmp_path / "7")
    assert integrity.write_manifest(tmp_path / "7") == sum(len(d) for d in files.values())
    assert manifest_of(tmp_path / "7") == {k: {"size": len(d), "crc32": zlib.crc32(d)} for k, d in files.items()}
    assert integrity.verify(tmp_path / "7") == []
    data = bytearray(files["state/d/aa"])
    data[12345] ^= 1
    (tmp_path / "7" / "state/d/aa").write_bytes(bytes(data))
    assert integrity.verify(tmp_path / "7") == [f"{tmp_path / '7' / 'state/d/aa'}: checksum mismatch "
                                                "(bytes changed after the save)"]


def test_file_checksums_are_zlibs_crc32_across_windows_and_reads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests written with zlib's CRC32 must still verify: whichever implementation integrity uses
    (zlib-ng's where installed) gives zlib's value for a file, mapped in windows or read in pieces."""
    monkeypatch.setattr(integrity, "CRC_WINDOW", 2 * mmap.ALLOCATIONGRANULARITY)
    data = np.random.default_rng(0).integers(0, 256, 5 * mmap.ALLOCATIONGRANULARITY + 12_345, np.uint8).tobytes()
    write(tmp_path / "f", data)
    assert integrity._crc32(tmp_path / "f") == zlib.crc32(data)
    assert integrity._crc32_read(tmp_path / "f", bytearray(10_000)) == zlib.crc32(data)


def test_early_checksums_wait_until_a_file_is_unchanged_for_a_sweep(tmp_path: Path) -> None:
    root = tmp_path / "1.orbax-checkpoint-tmp-5"
    write(root / "done", b"x" * 1000)
    write(root / "growing", b"y" * 1000)
    early = integrity.EarlyChecksums(lambda: [root])
    early.sweep()
    assert early.crcs == {}  # first sight of both: either may still be written
    with open(root / "growing", "ab") as f:
        f.write(b"z" * 1000)
    early.sweep()
    assert sorted(early.crcs.values()) == [zlib.crc32(b"x" * 1000)]
    early.sweep()
    assert sorted(early.crcs.values()) == sorted([zlib.crc32(b"x" * 1000), zlib.crc32(b"y" * 1000 + b"z" * 1000)])
    assert early.stop() is early.crcs  # never started: stop() returns at once


def test_manifest_reuses_an_early_checksum_only_for_the_same_file_version(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "3.orbax-checkpoint-tmp-9"
    files = a_step(tmp)
    early = integrity.EarlyChecksums(lambda: tmp_path.glob("3.orbax-checkpoint-tmp*"))
    early.sweep()
    early.sweep()
    known = early.stop()
    assert len(known) == len(files)
    os.rename(tmp, tmp_path / "3")  # Orbax's commit
    time.sleep(0.05)  # past the file system's timestamp granularity: the rewrite below gets a new mtime
    changed = bytes(reversed(files["state/d/bb"]))  # same size, other bytes
    with open(tmp_path / "3" / "state/d/bb", "r+b") as f:
        f.write(changed)
    computed: list[str] = []
    crc32 = integrity._crc32
    monkeypatch.setattr(integrity, "_crc32", lambda p: computed.append(p.name) or crc32(p))
    integrity.write_manifest(tmp_path / "3", known)
    assert computed == ["bb"]
    assert manifest_of(tmp_path / "3")["state/d/bb"] == {"size": len(changed), "crc32": zlib.crc32(changed)}
    assert integrity.verify(tmp_path / "3") == []


def test_checkpointer_checksums_early_only_while_its_caller_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: list[integrity.EarlyChecksums]) -> None:
    handed: list[dict[integrity.FileVersion, int] | None] = []
    write_manifest = integrity.write_manifest
    monkeypatch.setattr(integrity, "write_manifest", lambda d, known=None: handed.append(known) or write_manifest(
        d, known))
    rng = np.random.default_rng(0)
    state = {f"w{i}": jax.device_put(rng.standard_normal((256, 1024), np.float32)) for i in range(4)}

    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(keep_latest=2)) as ckpt:
        ckpt.save(1, state, FixedIterator(), {"metrics": {}})
        ckpt.wait()  # as at a preemption or the end of training
        ckpt.save(2, state, FixedIterator(), {"metrics": {}})
        deadline = time.monotonic() + 60
        while ckpt._pending is not None and time.monotonic() < deadline:  # as between train steps
            ckpt.poll()
            time.sleep(0.01)
        assert ckpt._pending is None
    assert len(made) == 1 and not made[0]._thread.is_alive()
    assert handed == [made[0].crcs, None]
    for step in (1, 2):
        step_dir = tmp_path / "ckpt" / str(step)
        assert manifest_of(step_dir) == {str(p.relative_to(step_dir)): {"size": p.stat().st_size,
                                                                        "crc32": zlib.crc32(p.read_bytes())}
                                         for p in step_dir.rglob("*") if p.is_file() and p.name != integrity.MANIFEST}


def test_an_interrupted_wait_stops_the_early_checksums_and_a_later_wait_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: list[integrity.EarlyChecksums]) -> None:
    state = {"w": jax.device_put(np.arange(4096, dtype=np.float32))}

    with Checkpointer(tmp_path / "ckpt", CheckpointConfig()) as ckpt:
        ckpt.save(1, state, FixedIterator(), {"metrics": {}})
        ckpt._pending.start.join()  # Orbax's save call itself waits on the manager: not that one
        wait_until_finished = ckpt.manager.wait_until_finished

        def interrupted() -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(ckpt.manager, "wait_until_finished", interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                ckpt.wait()
        finally:
            monkeypatch.setattr(ckpt.manager, "wait_until_finished", wait_until_finished)
        assert len(made) == 1 and not made[0]._thread.is_alive()
        ckpt.wait()
        assert ckpt.complete_steps() == [1]
    assert len(made) == 2 and not made[1]._thread.is_alive()
