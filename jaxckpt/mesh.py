"""Device mesh from config and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxckpt.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name (declared on params and activations) -> mesh axis (or axes, or None).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "layers": None,
}


def resolve_mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve a -1 axis and check that the mesh uses exactly the available devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} cannot fill {n_devices} devices: "
                f"{n_devices} is not divisible by {known}. Choose sizes whose product divides "
                f"{n_devices}, e.g. mesh.data=-1 mesh.fsdp=1 mesh.tensor=1"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{n_devices} are available. Set one axis to -1 (e.g. mesh.data=-1) or make the "
            f"product of mesh.data*mesh.fsdp*mesh.tensor equal {n_devices}"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(logical: tuple[str | None, ...] | None) -> P:
    """PartitionSpec for a tuple of logical axis names via LOGICAL_RULES."""
    if not logical:
        return P()
    out = []
    for name in logical:
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        out.append(LOGICAL_RULES.get(name) if name else None)
    return P(*out)


def sharding_for(mesh: Mesh, logical: tuple[str | None, ...] | None, shape: tuple[int, ...]) -> NamedSharding:
    """NamedSharding for an array; mesh axes that do not divide a dimension are dropped."""
    spec = list(logical_to_spec(logical))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % math.prod(mesh.shape[a] for a in names):
            spec[i] = None
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "seq")))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
