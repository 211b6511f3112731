"""Token data with Grain: prepared token files -> windows -> shuffle/repeat -> batch -> per process.

On disk a prepared dataset is a directory with ``train.bin`` and ``val.bin`` (flat token ids,
uint16 or uint32) and ``meta.json``. Global batch ``s`` is the same on every topology: it holds
shuffled windows ``s*B … s*B+B-1``; process ``p`` of ``P`` reads rows ``p*B/P … (p+1)*B/P``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jaxckpt.config import ConfigError, DataConfig
from jaxckpt.mesh import batch_sharding
from jaxckpt.tokenizer import load_tokenizer

META = "meta.json"


def _write_tokens(path: Path, ids: np.ndarray, dtype: np.dtype) -> str:
    arr = ids.astype(dtype)
    with open(path, "wb") as f:
        f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(arr.tobytes()).hexdigest()


def prepare(inputs: list[Path], out: Path, tokenizer: str = "bytes", val_fraction: float = 0.05,
            force: bool = False) -> dict[str, Any]:
    """Tokenize text files into ``out`` (written atomically); returns the dataset metadata."""
    if not inputs:
        raise ValueError("prepare needs at least one input file")
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input files not found: {missing}")
    if (out / META).exists() and not force:
        raise FileExistsError(f"{out} already holds a prepared dataset; pass --force to rebuild it")
    tok = load_tokenizer(tokenizer)
    ids = np.concatenate([tok.encode(Path(p).read_text(encoding="utf-8", errors="replace")) for p in inputs])
    n_val = max(int(len(ids) * val_fraction), 1)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _write_dataset(tmp, out, tok, ids, n_val, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_dataset(tmp: Path, out: Path, tok: Any, ids: np.ndarray, n_val: int, inputs: list[Path]) -> dict[str, Any]:
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    meta = {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "n_train": int(len(ids) - n_val),
        "n_val": int(n_val),
        "train_sha256": _write_tokens(tmp / "train.bin", ids[:-n_val], dtype),
        "val_sha256": _write_tokens(tmp / "val.bin", ids[-n_val:], dtype),
        "sources": [str(p) for p in inputs][:20] + ([f"... {len(inputs) - 20} more"] if len(inputs) > 20 else []),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)  # the old dataset stays whole until the new one is in place
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def cache_dir() -> Path:
    base = os.environ.get("JAXCKPT_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxckpt"


def stdlib_sources(max_mb: float) -> list[Path]:
    """This Python's standard-library ``.py`` files, sorted, up to ``max_mb`` megabytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts:
            continue
        files.append(p)
        total += p.stat().st_size
        if total >= max_mb * 1e6:
            break
    return files


def ensure_dataset(cfg: DataConfig) -> Path:
    """The prepared dataset directory for ``cfg.path``; builds the default corpus on first use."""
    if cfg.path:
        path = Path(cfg.path)
        if not (path / META).is_file():
            raise ConfigError(
                f"data.path={cfg.path!r} is not a prepared dataset (no {META}). "
                f"Create it with: jaxckpt prepare --input FILE... --out {cfg.path}"
            )
        return path
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = cache_dir() / f"stdlib-py{ver}-{cfg.default_corpus_mb:g}mb"
    if not (path / META).is_file():
        print(f"[jaxckpt] preparing the default corpus (Python {ver} stdlib sources) in {path}", flush=True)
        prepare(stdlib_sources(cfg.default_corpus_mb), path, force=True)
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def fingerprint(path: Path) -> str:
    """Identity of a prepared dataset: changes when any token changes."""
    m = read_meta(path)
    key = json.dumps([m["tokenizer"], m["train_sha256"], m["val_sha256"]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class TokenWindows(grain.sources.RandomAccessDataSource):
    """Non-overlapping windows of ``seq_len + 1`` tokens from a memory-mapped token file."""

    def __init__(self, path: Path, dtype: str, seq_len: int):
        self.path, self.dtype, self.seq_len = str(path), dtype, seq_len
        n_tokens = os.path.getsize(path) // np.dtype(dtype).itemsize
        self._len = (n_tokens - 1) // seq_len
        self._mm: np.ndarray | None = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = int(i) * self.seq_len
        return np.asarray(self._mm[start : start + self.seq_len + 1], dtype=np.int32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None}

    def __repr__(self) -> str:
        return f"TokenWindows({self.path}, seq_len={self.seq_len}, n={self._len})"


def _absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclass(frozen=True)
class DataPosition:
    """Where a pipeline's iterator started (``offset``, in global batches) and its topology."""

    offset: int
    process_count: int
    worker_count: int


class DataPipeline:
    """Train iterator (checkpointable Grain iterator) and fixed eval batches as global arrays."""

    def __init__(self, cfg: DataConfig, seq_len: int, vocab_size: int, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.path = ensure_dataset(cfg)
        self.meta = read_meta(self.path)
        if self.meta["vocab_size"] > vocab_size:
            raise ConfigError(
                f"dataset vocab {self.meta['vocab_size']} exceeds model.vocab_size={vocab_size}; "
                f"set model.vocab_size={self.meta['vocab_size']}"
            )
        self.train_src = TokenWindows(self.path / "train.bin", self.meta["dtype"], seq_len)
        self.val_src = TokenWindows(self.path / "val.bin", self.meta["dtype"], seq_len)
        p_count = jax.process_count()
        if cfg.batch_size % (p_count * self._batch_divisor()):
            raise ConfigError(
                f"data.batch_size={cfg.batch_size} must be divisible by the batch mesh axes "
                f"({self._batch_divisor()}) times the process count ({p_count})"
            )
        if len(self.train_src) < cfg.batch_size:
            raise ConfigError(f"dataset {self.path} has {len(self.train_src)} windows, fewer than one batch")
        self.local_batch = cfg.batch_size // p_count
        self.sharding = batch_sharding(mesh)
        self.fingerprint = fingerprint(self.path)

    def _batch_divisor(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _local_batches(self, src: grain.sources.RandomAccessDataSource, shuffle: bool) -> grain.MapDataset:
        ds = grain.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=self.cfg.shuffle_seed)
        ds = ds.repeat(None).batch(self.local_batch, drop_remainder=True)
        return ds[jax.process_index() :: jax.process_count()]

    def position(self, offset: int) -> DataPosition:
        return DataPosition(offset, jax.process_count(), self.cfg.worker_count)

    def train_iterator(self, offset: int) -> grain.DatasetIterator:
        """A checkpointable iterator whose first batch is global batch ``offset``."""
        ds = self._local_batches(self.train_src, shuffle=True)[offset:]
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=self.cfg.prefetch))
        if self.cfg.worker_count > 0:
            _absl_flags_parsed()  # Grain's worker pool reads absl flags; nothing parses them under our CLI
            opts = grain.MultiprocessingOptions(
                num_workers=self.cfg.worker_count, per_worker_buffer_size=self.cfg.prefetch
            )
            it_ds = it_ds.mp_prefetch(opts)
        return iter(it_ds)

    def to_global(self, local_bt: np.ndarray) -> jax.Array:
        shape = (self.cfg.batch_size, local_bt.shape[1])
        return jax.make_array_from_process_local_data(self.sharding, local_bt, shape)

    def eval_batches(self, n: int) -> list[jax.Array]:
        if len(self.val_src) == 0:
            raise ConfigError(
                f"the validation split of {self.path} has no window of {self.val_src.seq_len + 1} tokens; "
                "prepare it with a larger --val-fraction, lower model.seq_len, or set train.eval_every=0"
            )
        ds = self._local_batches(self.val_src, shuffle=False)
        return [self.to_global(ds[i]) for i in range(n)]

    def describe(self) -> str:
        m = self.meta
        return (
            f"{self.path} ({m['tokenizer']}, {m['n_train']:,} train / {m['n_val']:,} val tokens, "
            f"{len(self.train_src):,} windows, workers={self.cfg.worker_count})"
        )
