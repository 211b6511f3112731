"""Prepared datasets, token windows and the Grain pipeline: determinism, shuffling, offsets, eval."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxckpt import data as data_lib
from jaxckpt.config import ConfigError, DataConfig, MeshConfig
from jaxckpt.data import DataPipeline, TokenWindows, ensure_dataset, fingerprint, prepare, read_meta
from jaxckpt.mesh import make_mesh

SEQ = 16
BATCH = 8


def write_text(path: Path, n_bytes: int, seed: int) -> bytes:
    """Deterministic printable-ASCII text (so every byte is one token)."""
    raw = np.random.default_rng(seed).integers(32, 127, size=n_bytes).astype(np.uint8).tobytes()
    path.write_bytes(raw)
    return raw


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A prepared dataset of 6000 random bytes: 5700 train tokens (356 windows of 16), 300 val."""
    root = tmp_path_factory.mktemp("data")
    raw = write_text(root / "text.txt", 6000, seed=1)
    prepare([root / "text.txt"], root / "ds")
    return root / "ds", raw


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))


def pipeline(path: Path, mesh: Mesh, **kw: object) -> DataPipeline:
    return DataPipeline(DataConfig(path=str(path), batch_size=BATCH, **kw), SEQ, 256, mesh)  # type: ignore[arg-type]


def take(p: DataPipeline, offset: int, n: int) -> list[np.ndarray]:
    it = p.train_iterator(offset)
    out = [np.asarray(next(it)) for _ in range(n)]
    getattr(it, "close", lambda: None)()
    return out


# -- prepare ---------------------------------------------------------------------------------


def test_prepare_writes_tokens_and_meta(tmp_path: Path) -> None:
    raw = write_text(tmp_path / "a.txt", 1000, seed=0)
    raw += write_text(tmp_path / "b.txt", 1000, seed=2)
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out" / "ds", val_fraction=0.1)
    ds = tmp_path / "out" / "ds"
    assert sorted(p.name for p in ds.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    # Nothing left next to it (the temporary directory was renamed into place).
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ds"]
    assert read_meta(ds) == meta
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    assert (meta["n_train"], meta["n_val"]) == (1800, 200)
    train = np.fromfile(ds / "train.bin", dtype=np.uint16)
    val = np.fromfile(ds / "val.bin", dtype=np.uint16)
    assert train.tobytes() == np.frombuffer(raw[:1800], np.uint8).astype(np.uint16).tobytes()
    assert bytes(val.astype(np.uint8)) == raw[1800:]
    assert meta["train_sha256"] == hashlib.sha256(train.tobytes()).hexdigest()
    assert meta["val_sha256"] == hashlib.sha256(val.tobytes()).hexdigest()


def test_prepare_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", 500, seed=0)
    write_text(tmp_path / "b.txt", 700, seed=3)
    ds = tmp_path / "ds"
    first = prepare([tmp_path / "a.txt"], ds)
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    with pytest.raises(FileExistsError, match="pass --force"):
        prepare([tmp_path / "b.txt"], ds)
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before
    second = prepare([tmp_path / "b.txt"], ds, force=True)
    assert second["n_train"] + second["n_val"] == 700
    assert second["train_sha256"] != first["train_sha256"]
    assert read_meta(ds) == second


def test_prepare_failure_leaves_existing_dataset_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing never leaves a half-written dataset under the final name."""
    write_text(tmp_path / "a.txt", 500, seed=0)
    ds = tmp_path / "ds"
    prepare([tmp_path / "a.txt"], ds)
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    real = data_lib._write_tokens
    calls = []

    def failing(path: Path, ids: np.ndarray, dtype: np.dtype) -> str:
        calls.append(path.name)
        if len(calls) == 2:  # train.bin written, val.bin fails
            raise OSError("disk full")
        return real(path, ids, dtype)

    monkeypatch.setattr(data_lib, "_write_tokens", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare([tmp_path / "a.txt"], ds, force=True)
    assert calls == ["train.bin", "val.bin"]
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before
    # A fresh (not yet existing) output is not created at all by a failed prepare.
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        prepare([tmp_path / "a.txt"], tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_prepare_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one input"):
        prepare([], tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare([tmp_path / "missing.txt"], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_fingerprint_tracks_content(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", 500, seed=0)
    write_text(tmp_path / "b.txt", 500, seed=1)
    prepare([tmp_path / "a.txt"], tmp_path / "d1")
    prepare([tmp_path / "a.txt"], tmp_path / "d2")
    prepare([tmp_path / "b.txt"], tmp_path / "d3")
    assert fingerprint(tmp_path / "d1") == fingerprint(tmp_path / "d2")
    assert fingerprint(tmp_path / "d1") != fingerprint(tmp_path / "d3")


def test_default_corpus_is_built_once_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXCKPT_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(default_corpus_mb=0.05)
    path = ensure_dataset(cfg)
    assert path.parent == tmp_path / "cache" / "jaxckpt"
    meta = read_meta(path)
    assert meta["n_train"] > 40_000 and meta["sources"][0].endswith(".py")
    stamp = (path / "train.bin").stat().st_mtime_ns
    assert ensure_dataset(cfg) == path
    assert (path / "train.bin").stat().st_mtime_ns == stamp  # not rebuilt


def test_data_path_that_is_not_prepared(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Create it with: jaxckpt prepare"):
        ensure_dataset(DataConfig(path=str(tmp_path)))


# -- windows ---------------------------------------------------------------------------------


def test_token_windows(corpus: tuple[Path, bytes]) -> None:
    path, raw = corpus
    src = TokenWindows(path / "train.bin", "uint16", SEQ)
    tokens = np.frombuffer(raw[:5700], np.uint8).astype(np.int32)
    assert len(src) == (5700 - 1) // SEQ == 356
    for i in (0, 1, 100, len(src) - 1):
        w = src[i]
        assert w.shape == (SEQ + 1,) and w.dtype == np.int32
        np.testing.assert_array_equal(w, tokens[i * SEQ : i * SEQ + SEQ + 1])
    # Consecutive windows overlap by exactly one token (the next-token target).
    assert src[3][-1] == src[4][0]
    # Picklable for Grain worker processes, without the memory map.
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[7], src[7])


# -- train pipeline --------------------------------------------------------------------------


def test_pipeline_batches_and_determinism(corpus: tuple[Path, bytes], mesh: Mesh) -> None:
    path, _ = corpus
    a, b = take(pipeline(path, mesh), 0, 50), take(pipeline(path, mesh), 0, 50)
    assert all(x.shape == (BATCH, SEQ + 1) and x.dtype == np.int32 for x in a)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # Another shuffle seed gives another order.
    c = take(pipeline(path, mesh, shuffle_seed=1), 0, 3)
    assert not np.array_equal(np.stack(a[:3]), np.stack(c))


def test_pipeline_shuffles_each_epoch_differently(corpus: tuple[Path, bytes], mesh: Mesh) -> None:
    path, _ = corpus
    p = pipeline(path, mesh)
    n = len(p.train_src)
    rows = np.concatenate(take(p, 0, (2 * n) // BATCH + 1))
    all_windows = np.stack([p.train_src[i] for i in range(n)])
    ids = {w.tobytes(): i for i, w in enumerate(all_windows)}
    assert len(ids) == n  # random text: windows are distinct
    epoch0 = [ids[r.tobytes()] for r in rows[:n]]
    epoch1 = [ids[r.tobytes()] for r in rows[n : 2 * n]]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))  # each a permutation
    assert epoch0 != list(range(n))  # shuffled
    assert epoch0 != epoch1  # reshuffled per epoch


@pytest.mark.parametrize("k", [1, 5, 44, 90])
def test_train_iterator_offset(corpus: tuple[Path, bytes], mesh: Mesh, k: int) -> None:
    """Batch k of an iterator at offset 0 equals batch 0 of an iterator at offset k (also past an epoch)."""
    path, _ = corpus
    p = pipeline(path, mesh)
    from_zero = take(p, 0, k + 3)
    from_k = take(p, k, 3)
    for x, y in zip(from_zero[k:], from_k, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(from_zero[0], from_k[0])


def test_train_iterator_state_roundtrip(corpus: tuple[Path, bytes], mesh: Mesh) -> None:
    """The Grain iterator state (what checkpoints store) restores the exact position."""
    path, _ = corpus
    p = pipeline(path, mesh)
    it = p.train_iterator(3)
    for _ in range(4):
        next(it)
    state = it.get_state()
    json.dumps(state)  # small and JSON-serialisable
    expected = [np.asarray(next(it)) for _ in range(3)]
    fresh = p.train_iterator(3)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(np.asarray(next(fresh)), want)
    np.testing.assert_array_equal(expected[0], take(p, 7, 1)[0])


def test_to_global_shards_batch_over_data_and_fsdp(corpus: tuple[Path, bytes], mesh: Mesh) -> None:
    path, _ = corpus
    p = pipeline(path, mesh)
    local = take(p, 0, 1)[0]
    g = p.to_global(local)
    assert g.shape == (BATCH, SEQ + 1)
    assert g.sharding.spec == P(("data", "fsdp"), None)
    assert len(g.addressable_shards) == 8
    assert {s.data.shape for s in g.addressable_shards} == {(1, SEQ + 1)}
    np.testing.assert_array_equal(np.asarray(g), local)


def test_eval_batches_are_fixed(corpus: tuple[Path, bytes], mesh: Mesh) -> None:
    path, raw = corpus
    p = pipeline(path, mesh)
    first, again = p.eval_batches(2), pipeline(path, mesh, shuffle_seed=5).eval_batches(2)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Unshuffled: batch 0 holds validation windows 0..B-1 in order.
    val = np.frombuffer(raw[5700:], np.uint8).astype(np.int32)
    want = np.stack([val[i * SEQ : i * SEQ + SEQ + 1] for i in range(BATCH)])
    np.testing.assert_array_equal(np.asarray(first[0]), want)
    assert first[0].sharding.spec == P(("data", "fsdp"), None)


# -- pipeline errors -------------------------------------------------------------------------


def test_pipeline_config_errors(corpus: tuple[Path, bytes], mesh: Mesh, tmp_path: Path) -> None:
    path, _ = corpus
    with pytest.raises(ConfigError, match=r"data.batch_size=6 must be divisible by the batch mesh axes \(8\)"):
        DataPipeline(DataConfig(path=str(path), batch_size=6), SEQ, 256, mesh)
    with pytest.raises(ConfigError, match="set model.vocab_size=256"):
        DataPipeline(DataConfig(path=str(path), batch_size=BATCH), SEQ, 128, mesh)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        DataPipeline(DataConfig(path=str(path), batch_size=512), SEQ, 256, mesh)
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        DataPipeline(DataConfig(path=str(tmp_path)), SEQ, 256, mesh)


def test_val_split_shorter_than_a_window_is_a_config_error(tmp_path: Path, mesh: Mesh) -> None:
    write_text(tmp_path / "a.txt", 1200, seed=0)  # 60 val tokens: no window of 64 + 1; 17 train windows
    prepare([tmp_path / "a.txt"], tmp_path / "ds")
    with pytest.raises(ConfigError):
        p = DataPipeline(DataConfig(path=str(tmp_path / "ds"), batch_size=BATCH), 64, 256, mesh)
        p.eval_batches(1)


def test_worker_processes_give_the_same_batches(corpus: tuple[Path, bytes], mesh: Mesh) -> None:
    path, _ = corpus
    expected = take(pipeline(path, mesh), 2, 4)
    got = take(pipeline(path, mesh, worker_count=1), 2, 4)
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x, y)
