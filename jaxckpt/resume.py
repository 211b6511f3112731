"""Where a run starts: fresh, resumed from the newest good checkpoint, or initialised from one.

Also owns what a checkpoint's ``meta`` records and the rules for resuming under a changed config.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from jaxckpt import checkpoint as ckpt_lib
from jaxckpt import distributed, integrity, layout
from jaxckpt.config import Config
from jaxckpt.errors import ResumeError
from jaxckpt.metrics import log
from jaxckpt.state import create_state

if TYPE_CHECKING:
    from jaxckpt.trainer import Run

PyTree = Any
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "jaxckpt")
# Config sections/keys that must not change across a resume (they change what the bits mean).
UNSAFE_KEYS = ("model.", "optim.", "data.path", "data.shuffle_seed", "data.batch_size",
               "data.default_corpus_mb", "train.seed")
# How the step is computed, not what it computes: the state is the same (scan_layers: in another layout,
# converted exactly on restore by jaxckpt.layout).
SAFE_MODEL_KEYS = ("model.remat", "model.scan_layers", "model.attention")


@dataclass
class Start:
    state: PyTree
    step: int
    iterator: Any
    offset: int  # global batch index at which ``iterator`` was created
    resumed_from: int | None = None


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def checkpoint_meta(run: Run, step: int, offset: int, metrics: dict[str, float]) -> dict[str, Any]:
    pos = run.data.position(offset)
    return {
        "step": step,
        "time": time.time(),
        "config": run.cfg.to_dict(),
        "mesh": dict(run.mesh.shape),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "versions": versions(),
        "data": {
            "fingerprint": run.data.fingerprint,
            "offset": pos.offset,
            "process_count": pos.process_count,
            "worker_count": pos.worker_count,
        },
        "metrics": metrics,
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], current: Config) -> tuple[list[str], list[str]]:
    """(safe, unsafe) differences between a checkpoint's config and the current one.

    The saved config is read back through ``Config.from_dict``: a key added after the checkpoint was written
    takes its default, which is what that run did (a new key's default keeps the old behaviour).
    """
    old, new = _flatten(Config.from_dict(saved).to_dict()), _flatten(current.to_dict())
    safe, unsafe = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            is_unsafe = key.startswith(UNSAFE_KEYS) and key not in SAFE_MODEL_KEYS
            (unsafe if is_unsafe else safe).append(line)
    return safe, unsafe


def check_compatible(run: Run, meta: dict[str, Any], step: int) -> None:
    safe, unsafe = config_changes(meta["config"], run.cfg)
    if meta["data"]["fingerprint"] != run.data.fingerprint:
        unsafe.append(f"data fingerprint: {meta['data']['fingerprint']} -> {run.data.fingerprint}")
    if unsafe:
        raise ResumeError(
            f"checkpoint {step} in {run.workdir / 'checkpoints'} was written with a different setup:\n  "
            + "\n  ".join(unsafe)
            + "\nRestore the original values, start fresh with train.resume=overwrite (deletes the "
            "checkpoints) or use another --workdir."
        )
    if safe:
        log(f"resuming with changed settings: {'; '.join(safe)}")


def prepare_dir(cfg: Config, workdir: Path) -> None:
    """Apply ``train.resume``: ``never`` refuses to mix with old checkpoints, ``overwrite`` removes them."""
    directory = workdir / "checkpoints"
    existing = ckpt_lib.list_steps(directory)
    if cfg.train.resume == "overwrite" and existing:
        if jax.process_index() == 0:
            log(f"train.resume=overwrite: deleting checkpoints {existing} in {directory}")
            ckpt_lib.remove_all(directory)
        distributed.barrier("jaxckpt_overwrite")
    elif cfg.train.resume == "never" and existing:
        raise ResumeError(
            f"{directory} already holds checkpoints {existing} and train.resume=never. "
            "Use train.resume=auto to continue, train.resume=overwrite to delete them, or another --workdir."
        )


def _usable(run: Run, ckpt: ckpt_lib.Checkpointer, step: int) -> str | None:
    """Why ``step`` cannot be trusted, or None if its bytes match its manifest (decided by process 0)."""
    reason = _check_files(run, ckpt, step) if jax.process_index() == 0 else None
    ok = distributed.agree(int(reason is None))
    return None if ok else (reason or "rejected by process 0 (see its log)")


def _check_files(run: Run, ckpt: ckpt_lib.Checkpointer, step: int) -> str | None:
    if run.cfg.checkpoint.verify_on_resume:
        step_dir = ckpt.step_dir(step)
        problems = integrity.verify(step_dir)
        if problems:
            return "; ".join(problems[:5])
    return None


def _restore_step(run: Run, ckpt: ckpt_lib.Checkpointer, step: int) -> Start:
    meta = ckpt.meta(step)
    check_compatible(run, meta, step)
    pos = meta["data"]
    same_topology = (pos["process_count"], pos["worker_count"]) == (jax.process_count(), run.cfg.data.worker_count)
    offset = pos["offset"] if same_topology else step
    iterator = run.data.train_iterator(offset)
    abstract = run.abstract_state()
    saved_stacked = Config.from_dict(meta["config"]).model.scan_layers
    source = abstract if saved_stacked == run.cfg.model.scan_layers else layout.other_layout_state(abstract)
    try:
        state = layout.convert_state(ckpt.restore(step, source, iterator if same_topology else None), abstract)
    except BaseException:
        getattr(iterator, "close", lambda: None)()
        raise
    how = "data iterator restored" if same_topology else "data stream repositioned at global batch"
    log(f"resumed from checkpoint {step} in {ckpt.directory} ({how} {step})")
    run.last_metrics = dict(meta.get("metrics", {}))
    return Start(state, step, iterator, offset, resumed_from=step)


def drop_incomplete(ckpt: ckpt_lib.Checkpointer) -> None:
    """Remove steps without a manifest: saves cut short by a crash, never committed by jaxckpt."""
    for step in ckpt.steps():
        local = jax.process_index() == 0 and not integrity.has_manifest(ckpt.step_dir(step))
        if distributed.agree(int(local)):
            log(f"removing incomplete checkpoint {step}: its save never completed (the process was stopped "
                "while writing it)")
            ckpt.manager.delete(step)


def restore_latest(run: Run, ckpt: ckpt_lib.Checkpointer) -> Start | None:
    """Restore the newest good checkpoint; bad newer ones are reported, then moved aside."""
    drop_incomplete(ckpt)
    steps, bad = ckpt.steps(), []
    for step in reversed(steps):
        reason = _usable(run, ckpt, step)
        if reason is None:
            try:
                start = _restore_step(run, ckpt, step)
            except ResumeError:
                raise
            except Exception as e:  # noqa: BLE001 - any restore failure means: try an older one
                reason = f"restore failed: {type(e).__name__}: {e}"
            else:
                for s, why in bad:
                    ckpt.quarantine(s, why)
                return start
        bad.append((step, reason))
        log(f"WARNING: checkpoint {step} is not usable ({reason}); trying an older one")
    if steps:
        raise ResumeError(
            f"no checkpoint in {ckpt.directory} is usable; nothing was deleted:\n  "
            + "\n  ".join(f"{s}: {why}" for s, why in bad)
            + "\nMove the directory aside, or start fresh with train.resume=overwrite (deletes them)."
        )
    return None


def start_state(run: Run, ckpt: ckpt_lib.Checkpointer) -> Start:
    start = restore_latest(run, ckpt) if run.cfg.train.resume == "auto" else None
    if start is None:
        state = create_state(run.mdef, run.tx, run.mesh, run.cfg.train.seed, run.shardings)
        if run.cfg.train.init_from:
            state["params"] = ckpt_lib.load_params(run.cfg.train.init_from, run.abstract_state()["params"])
            log(f"initialised params from {run.cfg.train.init_from} (fresh optimizer, step 0)")
        start = Start(state, 0, run.data.train_iterator(0), 0)
    else:
        ckpt.schedule.saved(start.step)
    return start
