"""Typed, frozen, validated configuration with dotted command-line overrides.

A config file is a Python file defining ``get_config() -> Config``. Overrides look like
``train.steps=200 mesh.fsdp=4`` and are type-checked against the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from jaxckpt.errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 192
    seq_len: int = 64
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dropout: float = 0.0  # residual dropout; uses the per-step RNG key
    # Recompute activations in the backward pass instead of keeping them: "none"; "block" keeps only each
    # block's input (least memory, ~1/3 more FLOPs); "dots" also keeps the weight matmuls' outputs.
    remat: Literal["none", "block", "dots"] = "none"
    # One lax.scan over blocks stacked on a leading "layers" axis instead of n_layers copies of the block in
    # the program: compile time stops growing with depth (an H200 did not compile 18 unrolled gpt1b blocks in
    # 4.5 min). Changes the params' layout; resume and train.init_from convert between layouts (jaxckpt.layout).
    scan_layers: bool = False
    # Attention kernel: "xla" (XLA's own: it materialises each head's T x T scores) or "cudnn" (cuDNN's fused
    # flash attention, bfloat16 only; used where the backend is a GPU, XLA's elsewhere, so such a config
    # still runs, tests and samples on a CPU). Same math, other rounding: a safe change on resume.
    attention: Literal["xla", "cudnn"] = "xla"

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive")
        _check(
            self.d_model % self.n_heads == 0,
            f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}",
        )
        _check((self.d_model // self.n_heads) % 2 == 0, "model.d_model/n_heads must be even (rotary)")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(self.init_std > 0 and self.rope_theta > 0, "model.init_std and model.rope_theta must be positive")
        _check(self.attention != "cudnn" or self.dtype == "bfloat16",
               "model.attention=cudnn needs model.dtype=bfloat16 (cuDNN's flash attention has no float32 kernel); "
               "set model.dtype=bfloat16 or model.attention=xla")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    warmup_steps: int = 10
    decay_steps: int = 0  # 0 = decay over train.steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr must be positive")
        _check(self.warmup_steps >= 0 and self.decay_steps >= 0, "optim step counts must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        _check(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "optim.b1/b2 must be in [0, 1)")
        _check(self.clip_norm >= 0, "optim.clip_norm must be >= 0 (0 disables clipping)")
        _check(self.eps > 0, "optim.eps must be positive")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    # "" = the default corpus (this Python's standard library sources), prepared and cached
    # on first use; otherwise a directory written by `jaxckpt prepare`.
    path: str = ""
    batch_size: int = 8  # global batch, in sequences
    shuffle_seed: int = 0
    worker_count: int = 0  # Grain worker processes; 0 = in-process
    prefetch: int = 2  # batches buffered per worker
    default_corpus_mb: float = 4.0

    def validate(self) -> None:
        _check(self.batch_size > 0, "data.batch_size must be positive")
        _check(self.worker_count >= 0, "data.worker_count must be >= 0")
        _check(self.prefetch >= 1, "data.prefetch must be >= 1")
        _check(self.default_corpus_mb > 0, "data.default_corpus_mb must be positive")


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s >= 1 for s in sizes), "mesh axis sizes must be >= 1 or -1")
        _check(sizes.count(-1) <= 1, "at most one mesh axis may be -1 (= the remaining devices)")


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 100  # save every N steps (0 = off)
    every_seconds: float = 0.0  # also save when this much time passed since the last save (0 = off)
    keep_latest: int = 3  # retention: newest K checkpoints
    keep_every: int = 0  # retention: also keep every M-th step forever (0 = off)
    keep_best: int = 0  # retention: also keep the best B by best_metric (0 = off)
    best_metric: str = "eval_loss"
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = True
    verify_on_resume: bool = True  # check every byte against the checksum manifest before restoring
    fast_restore: bool = True  # read the state with jaxckpt.fastread (same files; Orbax when it cannot)
    on_save_error: Literal["stop", "continue"] = "stop"  # full disk etc.: stop cleanly, or keep training
    grace_seconds: float = 30.0  # preemption notice; warn when a save is estimated to take longer
    # Nice value (Linux) of the threads that write a save beside training: Orbax's, TensorStore's and the
    # manifest's. 19 leaves the cores to the train step; 0 runs them as training runs.
    save_nice: int = 19
    # With save_nice > 0, those threads also run in Linux's SCHED_IDLE class: only on CPU time that training
    # leaves, where nice 19 still takes a share of busy cores (benchmarks/README.md §2, twenty-fifth session).
    save_idle: bool = True
    # On the CPU backend, where the train step and a save share the cores: a save the trainer starts beside
    # training (not the last one, nor one at a preemption) writes at most this many MB/s, in windows every
    # 0.5 s, so its CPU spreads over several steps. Anything that waits for the save lifts the pace. 0: write
    # at once. Ignored on accelerators and with several processes (jaxckpt.pacing).
    write_mb_s: float = 32.0
    # A process writing more than this many MiB in one save spreads its arrays over several OCDBT stores
    # (up to 8), whose commits overlap (jaxckpt.substores): the same plain Orbax checkpoint.
    ocdbt_store_mb: float = 1024.0

    def validate(self) -> None:
        _check(self.every_steps >= 0 and self.every_seconds >= 0, "checkpoint intervals must be >= 0")
        _check(0 <= self.save_nice <= 19, "checkpoint.save_nice must be 0-19 (0: as training, 19: lowest)")
        _check(self.write_mb_s >= 0, "checkpoint.write_mb_s must be >= 0 (0: saves write at once)")
        _check(self.ocdbt_store_mb > 0, "checkpoint.ocdbt_store_mb must be > 0 (MiB a save writes per OCDBT store)")
        _check(self.keep_latest >= 1, "checkpoint.keep_latest must be >= 1")
        _check(self.keep_every >= 0 and self.keep_best >= 0, "checkpoint.keep_* must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0 = no eval
    eval_batches: int = 4
    resume: Literal["auto", "never", "overwrite"] = "auto"
    init_from: str = ""  # PATH[:STEP] of a checkpoint to take params from (fine-tuning)
    progress: bool = True
    tensorboard: bool = True
    compilation_cache: str = "auto"  # JAX's compilation cache + compiled train steps; "auto" = user cache; "" = off
    # Compile the train and eval steps with XLA's deterministic GPU kernels and no autotuning, so a resume that
    # recompiles them (another machine, an upgrade) still continues bit for bit. No effect on CPUs and TPUs,
    # which are deterministic anyway. false: faster GPU steps (1.34x on a 4-layer gpt125m on an H200), but a
    # recompiled step can differ in the bits (benchmarks/README.md §6).
    deterministic: bool = True

    def validate(self) -> None:
        _check(self.steps > 0, "train.steps must be positive")
        _check(self.log_every > 0, "train.log_every must be positive")
        _check(self.eval_every >= 0, "train.eval_every must be >= 0 (0 = no eval)")
        _check(self.eval_batches > 0, "train.eval_batches must be positive")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        parts = {}
        for f in fields(cls):
            sub_cls = f.default_factory  # type: ignore[misc]
            known = {sf.name for sf in fields(sub_cls)}
            parts[f.name] = sub_cls(**{k: v for k, v in d.get(f.name, {}).items() if k in known})
        return cls(**parts)


def _coerce(raw: str, typ: Any, key: str) -> Any:
    """Parse ``raw`` as a value of type ``typ`` (int, float, bool, str or Literal)."""
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if raw not in choices:
            raise ConfigError(f"{key}={raw!r} is not one of {list(choices)}")
        return raw
    if typ is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    return raw


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(options))}."


def all_keys(cfg: Config) -> list[str]:
    return [f"{s.name}.{sf.name}" for s in fields(cfg) for sf in fields(getattr(cfg, s.name))]


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` overrides; raises ConfigError naming the bad key and a fix."""
    updates: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        if key not in all_keys(cfg):
            raise ConfigError(f"unknown config key {key!r}." + _suggest(key, all_keys(cfg)))
        section, name = key.split(".")
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        updates.setdefault(section, {})[name] = _coerce(raw, hints[name], key)
    parts = {s: replace(getattr(cfg, s), **kv) for s, kv in updates.items()}
    return replace(cfg, **parts)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load ``get_config()`` from a config file (None = the built-in default) and apply overrides."""
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (try configs/tiny.py)")
        spec = importlib.util.spec_from_file_location(f"jaxckpt_config_{p.stem}", p)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        if not isinstance(getattr(module, "get_config", None), types.FunctionType):
            raise ConfigError(f"{p} must define get_config() returning jaxckpt.config.Config")
        cfg = module.get_config()
        if not isinstance(cfg, Config):
            raise ConfigError(f"{p}: get_config() returned {type(cfg).__name__}, not Config")
    return apply_overrides(cfg, overrides or [])
