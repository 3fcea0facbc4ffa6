"""Mesh from config and logical-axis rules: layers name their axes, this table places them."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: embed over fsdp, heads/kv/mlp/vocab over tensor.
# Activations: batch over (data, fsdp). Anything unnamed or absent is replicated.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all processes' devices; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or n % known:
        raise ConfigError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide the {n} available devices"
        )
    sizes = [n // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
            f"devices, but {n} are available"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # hybrid/unknown topologies: plain order is still correct
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(config) -> Mesh:
    """The (data, fsdp, tensor) mesh of `config.mesh` over every process's devices."""
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for logical axes; a mesh axis that does not divide the dim (or is reused) is dropped."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        size = 1
        for t in targets:
            if t in used or mesh.shape[t] == 1:
                continue
            if dim % (size * mesh.shape[t]) == 0:
                kept.append(t)
                size *= mesh.shape[t]
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names a parameter was declared with (None if it has none)."""
    return var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None


def state_shardings(state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
    """NamedSharding for every leaf of an (abstract) state, from its variables' logical axes.

    Also takes optimizer states: their moments are Variables carrying the param's axes; plain
    leaves (step counts) and leaves whose rank differs from their axes (Adafactor's factored
    moments) are replicated.
    """

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = logical_axes(var)
        if axes is None or len(axes) != len(value.shape):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    """Sharding of [batch, length] arrays: rows over the mesh axes `batch` maps to (data, fsdp)."""
    rules = RULES if rules is None else rules
    target = rules.get("batch")
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept = tuple(t for t in targets if mesh.shape[t] > 1)
    return NamedSharding(mesh, PartitionSpec(kept if kept else None))


def batch_shards(mesh: Mesh, rules: dict | None = None) -> int:
    """How many ways the batch dimension is split (rows must divide by it)."""
    spec = batch_sharding(mesh, rules).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[a] for a in axes]))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("ftjax_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict | None = None):
    """Within this context (at trace time), `constrain` places activations on `mesh`."""
    token = _ACTIVE.set((mesh, RULES if rules is None else rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))
