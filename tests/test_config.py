"""Config loading, dotted overrides, validation and mesh-shape resolution."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jaxckpt.config import (
    Config,
    ConfigError,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    all_keys,
    apply_overrides,
    load_config,
)
from jaxckpt.mesh import resolve_mesh_shape

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# -- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "small", "gpt125m", "gpt1b"])
def test_every_shipped_config_loads_and_validates(name: str) -> None:
    """Each configs/*.py defines get_config() returning a valid Config."""
    cfg = load_config(CONFIGS / f"{name}.py")
    assert isinstance(cfg, Config)
    # Round trip through a dict (what checkpoints store) gives back the same config.
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg


def test_shipped_configs_are_the_ones_tested() -> None:
    """A new config file must be added to the parametrized list above."""
    assert sorted(p.stem for p in CONFIGS.glob("*.py")) == ["gpt125m", "gpt1b", "small", "tiny"]


def test_none_path_is_default_and_tiny_matches_it() -> None:
    assert load_config(None) == Config()
    assert load_config(CONFIGS / "tiny.py") == Config()


def test_shipped_config_values() -> None:
    """Spot checks that the config file is really executed, not defaulted."""
    cfg = load_config(CONFIGS / "gpt125m.py")
    assert cfg.model.d_model == 768 and cfg.model.dtype == "bfloat16"
    assert cfg.mesh == MeshConfig(data=1, fsdp=-1, tensor=1)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found \(try configs/tiny.py\)"):
        load_config(tmp_path / "nope.py")


def test_config_file_without_get_config(tmp_path: Path) -> None:
    p = tmp_path / "bad.py"
    p.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_config(p)


def test_config_file_returning_wrong_type(tmp_path: Path) -> None:
    p = tmp_path / "bad.py"
    p.write_text("def get_config():\n    return {'model': {}}\n")
    with pytest.raises(ConfigError, match="returned dict, not Config"):
        load_config(p)


def test_config_file_with_overrides(tmp_path: Path) -> None:
    p = tmp_path / "mine.py"
    p.write_text(
        "from jaxckpt.config import Config, TrainConfig\n"
        "def get_config():\n    return Config(train=TrainConfig(steps=7, log_every=1))\n"
    )
    cfg = load_config(p, ["train.steps=9", "model.d_model=32"])
    assert cfg.train.steps == 9 and cfg.train.log_every == 1 and cfg.model.d_model == 32


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


# -- overrides -------------------------------------------------------------------------------


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(
        Config(),
        [
            "train.steps=123",
            "optim.lr=1e-4",
            "optim.clip_norm=2",
            "train.progress=false",
            "checkpoint.async_save=0",
            "model.tie_embeddings=YES",
            "model.dtype=bfloat16",
            "train.resume=never",
            "data.path=/some/where=odd",
            "mesh.data=-1",
        ],
    )
    assert cfg.train.steps == 123 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.clip_norm == 2.0 and type(cfg.optim.clip_norm) is float
    assert cfg.train.progress is False and cfg.checkpoint.async_save is False
    assert cfg.model.tie_embeddings is True
    assert cfg.model.dtype == "bfloat16" and cfg.train.resume == "never"
    assert cfg.data.path == "/some/where=odd"  # only the first '=' splits
    assert cfg.mesh.data == -1
    # Untouched fields keep their defaults; the input config is not mutated.
    assert cfg.model.d_model == Config().model.d_model
    assert Config().train.steps == 200


def test_later_override_wins() -> None:
    assert apply_overrides(Config(), ["train.steps=5", "train.steps=6"]).train.steps == 6


def test_no_overrides_is_identity() -> None:
    cfg = Config(train=TrainConfig(steps=11))
    assert apply_overrides(cfg, []) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=1.5", r"train.steps='1.5': expected an integer"),
        ("train.steps=ten", r"expected an integer"),
        ("optim.lr=fast", r"optim.lr='fast': expected a number"),
        ("train.progress=maybe", r"expected a boolean \(true/false\)"),
        ("model.dtype=float16", r"model.dtype='float16' is not one of \['float32', 'bfloat16'\]"),
        ("train.resume=yes", r"is not one of \['auto', 'never', 'overwrite'\]"),
        ("checkpoint.best_mode=MIN", r"is not one of \['min', 'max'\]"),
    ],
)
def test_override_type_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("train.step", "train.steps"),
        ("train.stpes", "train.steps"),
        ("model.dmodel", "model.d_model"),
        ("mesh.fdsp", "mesh.fsdp"),
        ("optim.warmup", "optim.warmup_steps"),
        ("checkpoint.every_step", "checkpoint.every_steps"),
    ],
)
def test_unknown_key_did_you_mean(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [f"{key}=5"])
    msg = str(e.value)
    assert f"unknown config key {key!r}" in msg
    assert f"Did you mean '{suggestion}'?" in msg


def test_unknown_key_without_close_match_lists_keys() -> None:
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["zzzz=1"])
    msg = str(e.value)
    assert "Did you mean" not in msg
    assert "Known keys:" in msg and "train.steps" in msg and "mesh.fsdp" in msg


@pytest.mark.parametrize("item", ["train.steps", "steps", "", "train.steps:5"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("item", ["train=5", "train.steps.x=5", "=5", ".steps=5"])
def test_override_key_with_wrong_shape_is_unknown(item: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(Config(), [item])


def test_all_keys_covers_every_field() -> None:
    keys = all_keys(Config())
    assert len(keys) == len(set(keys))
    assert {"train.steps", "model.d_model", "mesh.tensor", "checkpoint.keep_best", "data.worker_count"} <= set(keys)
    n_fields = sum(len(dataclasses.fields(getattr(Config(), f.name))) for f in dataclasses.fields(Config))
    assert len(keys) == n_fields


def test_override_that_breaks_validation_is_rejected() -> None:
    """Overrides go through the same validation as config files."""
    with pytest.raises(ConfigError, match="divisible by model.n_heads"):
        apply_overrides(Config(), ["model.n_heads=5"])
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        apply_overrides(Config(), ["mesh.fsdp=-1"])  # mesh.data is already -1


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "kwargs", "message"),
    [
        ("mesh", {"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
        ("mesh", {"data": 0}, "mesh axis sizes must be >= 1 or -1"),
        ("mesh", {"tensor": -2}, "mesh axis sizes must be >= 1 or -1"),
        ("model", {"d_model": 30, "n_heads": 4}, "model.d_model=30 must be divisible by model.n_heads=4"),
        ("model", {"d_model": 12, "n_heads": 4}, r"d_model/n_heads must be even \(rotary\)"),
        ("model", {"n_layers": 0}, "model.n_layers must be positive"),
        ("model", {"vocab_size": -1}, "model.vocab_size must be positive"),
        ("model", {"dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
        ("optim", {"lr": 0.0}, "optim.lr must be positive"),
        ("optim", {"b2": 1.0}, "optim.b1/b2"),
        ("optim", {"min_lr_ratio": 1.5}, "optim.min_lr_ratio"),
        ("optim", {"warmup_steps": -1}, "optim step counts must be >= 0"),
        ("optim", {"clip_norm": -1.0}, "optim.clip_norm"),
        ("data", {"batch_size": 0}, "data.batch_size must be positive"),
        ("data", {"worker_count": -1}, "data.worker_count"),
        ("train", {"steps": 0}, "train.steps must be positive"),
        ("train", {"log_every": 0}, "train.log_every must be positive"),
        ("train", {"eval_batches": 0}, "train.eval_"),
        ("checkpoint", {"keep_latest": 0}, "checkpoint.keep_latest must be >= 1"),
        ("checkpoint", {"save_nice": 20}, r"checkpoint.save_nice must be 0-19"),
        ("checkpoint", {"save_nice": -1}, r"checkpoint.save_nice must be 0-19"),
        ("checkpoint", {"write_mb_s": -1.0}, r"checkpoint.write_mb_s must be >= 0"),
        ("checkpoint", {"ocdbt_store_mb": 0.0}, r"checkpoint.ocdbt_store_mb must be > 0"),
        ("checkpoint", {"every_steps": -1}, "checkpoint intervals must be >= 0"),
    ],
)
def test_validation_errors(section: str, kwargs: dict, message: str) -> None:
    sub_cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]
    with pytest.raises(ConfigError, match=message):
        Config(**{section: sub_cls(**kwargs)})


def test_validation_accepts_edge_values() -> None:
    cfg = Config(
        model=ModelConfig(d_model=8, n_heads=4, dropout=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        train=TrainConfig(eval_every=0),
    )
    assert cfg.model.d_model // cfg.model.n_heads == 2


def test_config_error_is_value_error() -> None:
    """Callers that catch ValueError (e.g. argparse-style code) also see config errors."""
    assert issubclass(ConfigError, ValueError)


# -- mesh shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh", "n", "shape"),
    [
        (MeshConfig(), 8, (8, 1, 1)),
        (MeshConfig(data=-1, fsdp=2, tensor=2), 8, (2, 2, 2)),
        (MeshConfig(data=1, fsdp=-1, tensor=2), 8, (1, 4, 2)),
        (MeshConfig(data=4, fsdp=2, tensor=1), 8, (4, 2, 1)),
        (MeshConfig(data=1, fsdp=1, tensor=1), 1, (1, 1, 1)),
        (MeshConfig(data=-1, fsdp=8, tensor=1), 8, (1, 8, 1)),
    ],
)
def test_resolve_mesh_shape(mesh: MeshConfig, n: int, shape: tuple[int, int, int]) -> None:
    assert resolve_mesh_shape(mesh, n) == shape


def test_mesh_that_needs_more_devices_names_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    msg = str(e.value)
    assert "needs 3 devices but 8 are available" in msg
    assert "mesh.data=-1" in msg and "equal 8" in msg


def test_mesh_too_large_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=4, tensor=2), 8)


def test_mesh_with_wildcard_that_cannot_divide_names_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    msg = str(e.value)
    assert "cannot fill 8 devices" in msg and "not divisible by 3" in msg
    assert "mesh.data=-1 mesh.fsdp=1 mesh.tensor=1" in msg


def test_mesh_wildcard_larger_than_device_count() -> None:
    with pytest.raises(ConfigError, match="not divisible by 16"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=4, tensor=4), 8)
