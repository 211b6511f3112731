"""Checkpointer: one Orbax ``CheckpointManager`` writing ``state`` + ``data`` + ``meta`` per step.

Layout: ``DIR/checkpoints/<step>/{state,data,meta}``. ``state`` holds the sharded train state
(uncompressed zarr3 on OCDBT), ``data`` the Grain iterator state, ``meta`` JSON with the resolved
config, mesh, versions, data fingerprint and position, and the metrics at that step.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxckpt.config import CheckpointConfig, ConfigError
from jaxckpt.metrics import log
from jaxckpt.policies import Clock, retention, save_schedule

PyTree = Any
ITEMS = ("state", "data", "meta")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def state_handler() -> ocp.PyTreeCheckpointHandler:
    # Compression costs most of the save time on few cores for little space (DESIGN.md §3).
    return ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False)


def make_manager(directory: Path, async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        save_decision_policy=None,
        enable_background_delete=False,
    )
    handlers = {
        "state": state_handler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def read_meta(directory: Path, step: int) -> dict[str, Any]:
    """The ``meta`` item of a checkpoint, read straight from its JSON file."""
    import json

    path = Path(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())


class Checkpointer:
    """Save policy, retention and exact restore around one ``CheckpointManager``."""

    def __init__(self, directory: Path, cfg: CheckpointConfig, clock: Clock = time.monotonic):
        self.directory, self.cfg, self.clock = Path(directory), cfg, clock
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager = make_manager(self.directory, cfg.async_save)
        self.schedule = save_schedule(cfg, clock)
        self.retention = retention(cfg)
        self._metrics: dict[int, dict[str, float]] = {}
        self._inflight: tuple[int, float, float] | None = None  # step, start, blocking seconds
        self.last_blocking_s = 0.0

    # -- queries ---------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def meta(self, step: int) -> dict[str, Any]:
        return read_meta(self.directory, step)

    def should_save(self, step: int) -> bool:
        return self.cfg.enabled and self.schedule.should_save(step)

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, data_iter: Any, meta: dict[str, Any]) -> float:
        """Start saving ``step``; returns the seconds the caller was blocked."""
        self.wait()
        t0 = time.perf_counter()
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)
        blocking = time.perf_counter() - t0
        self._metrics[step] = dict(meta.get("metrics", {}))
        self._inflight = (step, t0, blocking)
        self.schedule.saved(step)
        self.last_blocking_s = blocking
        if not self.cfg.async_save:
            self.poll()
        return blocking

    def poll(self) -> None:
        """Report and apply retention once the in-flight save (if any) has committed."""
        if self._inflight is None or self.manager.is_saving_in_progress():
            return
        self.manager.check_for_errors()
        step, t0, blocking = self._inflight
        self._inflight = None
        total = time.perf_counter() - t0
        size = dir_size(self.step_dir(step))
        log(f"checkpoint {step}: {size / 1e6:.1f} MB, blocked {blocking:.3f}s, durable in {total:.2f}s")
        self.apply_retention()

    def wait(self) -> None:
        """Block until the in-flight save (if any) has committed."""
        self.manager.wait_until_finished()
        self.poll()

    def apply_retention(self) -> list[int]:
        steps = self.steps()
        for s in steps:
            if s not in self._metrics:
                try:
                    self._metrics[s] = self.meta(s).get("metrics", {})
                except (OSError, ValueError):
                    self._metrics[s] = {}
        keep = self.retention.reasons(steps, self._metrics)
        deleted = [s for s, why in keep.items() if not why]
        for s in deleted:
            self.manager.delete(s)
        return deleted

    # -- restoring -------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> PyTree:
        """Restore ``state`` into the shardings of ``abstract_state`` and, if given, the iterator."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        items: dict[str, Any] = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def remove_all(directory: Path) -> None:
    """Delete every checkpoint under ``directory`` (``train.resume=overwrite``)."""
    if Path(directory).exists():
        shutil.rmtree(directory)


def list_steps(directory: Path) -> list[int]:
    """Committed-looking step directories (Orbax temp dirs are ignored)."""
    d = Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def resolve(spec: str) -> tuple[Path, int]:
    """``PATH[:STEP]`` (a workdir, its ``checkpoints`` dir or a step dir) -> (checkpoints dir, step)."""
    path_s, _, step_s = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
    path = Path(path_s)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    elif path.name.isdigit() and (path / "state").is_dir():
        path, step_s = path.parent, step_s or path.name
    steps = list_steps(path)
    if not steps:
        raise FileNotFoundError(f"no checkpoints found under {spec!r} (expected WORKDIR or WORKDIR/checkpoints)")
    step = int(step_s) if step_s else steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not in {path}; available: {steps}")
    return path, step


def _shapes(tree: PyTree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ())) for k, v in flat}


def load_params(spec: str, abstract_params: PyTree) -> PyTree:
    """Params only from checkpoint ``spec`` into the target shardings; names and shapes checked."""
    directory, step = resolve(spec)
    item_dir = directory / str(step) / "state"
    saved = state_handler().metadata(item_dir).tree["params"]
    want, have = _shapes(abstract_params), _shapes(saved)
    problems = [f"missing in checkpoint: {k}" for k in want if k not in have]
    problems += [f"unexpected in checkpoint: {k}" for k in have if k not in want]
    problems += [f"shape of {k}: checkpoint {have[k]} vs model {want[k]}" for k in want
                 if k in have and have[k] != want[k]]
    if problems:
        raise ConfigError(f"train.init_from={spec}: params do not match the model config:\n  "
                         + "\n  ".join(problems[:20]))
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    with ocp.Checkpointer(state_handler()) as ckptr:
        return ckptr.restore(item_dir, args=args)["params"]
