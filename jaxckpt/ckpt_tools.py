"""``jaxckpt ckpt list|inspect|export``: read checkpoints without training."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import jax
import numpy as np

from jaxckpt import integrity
from jaxckpt.checkpoint import dir_size, list_steps, read_meta, resolve, state_handler
from jaxckpt.config import CheckpointConfig, Config, ConfigError
from jaxckpt.policies import retention


def _ckpt_dir(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def list_table(path: Path) -> str:
    directory = _ckpt_dir(Path(path))
    steps = list_steps(directory)
    if not steps:
        return f"no checkpoints in {directory}"
    metas = {s: _safe_meta(directory, s) for s in steps}
    cfg = metas[steps[-1]].get("config", {}).get("checkpoint", {})
    policy = retention(CheckpointConfig(**cfg)) if cfg else None
    why = policy.reasons(steps, {s: m.get("metrics", {}) for s, m in metas.items()}) if policy else {}
    rows = [f"{'step':>8}  {'saved at (UTC)':<19}  {'size MB':>9}  {'loss':>9}  {'complete':<8}  kept because"]
    for s in steps:
        m = metas[s]
        when = datetime.datetime.fromtimestamp(m["time"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") \
            if "time" in m else "?"
        loss = m.get("metrics", {}).get("loss")
        reasons = ", ".join(why.get(s, [])) or ("(unreadable meta)" if not m else "-")
        rows.append(f"{s:>8}  {when:<19}  {dir_size(directory / str(s)) / 1e6:>9.2f}  "
                    f"{'' if loss is None else f'{loss:.4f}':>9}  "
                    f"{'yes' if integrity.has_manifest(directory / str(s)) else 'NO':<8}  {reasons}")
    return "\n".join(rows)


def _safe_meta(directory: Path, step: int) -> dict:
    try:
        return read_meta(directory, step)
    except (OSError, ValueError):
        return {}


def inspect(path: Path, step: int | None) -> str:
    directory, step = resolve(f"{_ckpt_dir(Path(path))}:{step}" if step is not None else str(path))
    meta = read_meta(directory, step)
    tree = state_handler().metadata(directory / str(step) / "state").tree
    lines = [f"checkpoint {directory / str(step)}", "state:"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for key, leaf in flat:
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "partition_spec", None) or getattr(sharding, "spec", None)
        lines.append(f"  {jax.tree_util.keystr(key):<60} {str(getattr(leaf, 'dtype', '')):<9} "
                     f"{str(tuple(getattr(leaf, 'shape', ()))):<16} {spec if spec is not None else ''}")
    lines.append(f"mesh: {meta.get('mesh')}  devices: {meta.get('device_count')}  "
                 f"processes: {meta.get('process_count')}")
    lines.append(f"data: {json.dumps(meta.get('data'))}")
    lines.append(f"metrics: {json.dumps(meta.get('metrics'))}")
    lines.append(f"versions: {json.dumps(meta.get('versions'))}")
    lines.append("config:\n" + json.dumps(meta.get("config"), indent=2))
    return "\n".join(lines)


def _host_params(directory: Path, step: int) -> dict[str, np.ndarray]:
    """Params of a checkpoint as host numpy arrays keyed by dotted names, one set per layer
    (``blocks.0.attn.wq``, ...) whichever ``model.scan_layers`` layout the run trained with."""
    from jaxckpt.checkpoint import load_params
    from jaxckpt.state import params_on_one_device

    meta = read_meta(directory, step)
    model = dataclasses.replace(Config.from_dict(meta["config"]).model, scan_layers=False)
    params = load_params(f"{directory}:{step}", params_on_one_device(model))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def export(path: Path, step: int | None, out: Path) -> str:
    directory, step = resolve(f"{_ckpt_dir(Path(path))}:{step}" if step is not None else str(path))
    arrays = _host_params(directory, step)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(out), metadata={"step": str(step), "source": str(directory)})
    elif out.suffix == ".npz":
        np.savez(out, **arrays)
    else:
        raise ConfigError(f"--out must end in .safetensors or .npz, got {out.name}")
    total = sum(a.nbytes for a in arrays.values())
    return f"exported {len(arrays)} arrays ({total / 1e6:.1f} MB) from step {step} to {out}"


def verify(path: Path, step: int | None) -> tuple[bool, str]:
    """Check one step (or all) against their checksum manifests; (all good, report)."""
    directory = _ckpt_dir(Path(path))
    steps = [step] if step is not None else list_steps(directory)
    if not steps:
        return False, f"no checkpoints in {directory}"
    lines, ok = [], True
    for s in steps:
        problems = integrity.verify(directory / str(s))
        ok = ok and not problems
        lines.append(f"{s:>8}  " + ("OK" if not problems else "BAD\n" + "\n".join(f"          {p}" for p in problems)))
    return ok, "\n".join(lines)
