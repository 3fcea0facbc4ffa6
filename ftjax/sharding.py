"""Mesh from config and logical-axis rules: layers name their axes, this table places them."""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.errors import ConfigError
from ftjax.platform import platform_of

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes. Parameters: embed over fsdp, heads/kv/mlp/vocab over tensor, a mixture-of-experts
# layer's experts over expert. Activations: batch over (data, fsdp, expert): the expert axis also splits the
# tokens (expert parallelism), so it holds no idle replicas on dense layers. Anything unnamed or absent is replicated.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
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
    "expert": "expert",  # the experts of a mixture-of-experts layer (mesh.expert; size 1: replicated)
}


def parse_rules(text: str, key: str = "mesh.rules") -> dict[str, Any]:
    """RULES with overrides written `logical=mesh` (comma-separated; `+` joins mesh axes, nothing or `none`
    replicates), e.g. "embed=tensor,mlp=fsdp,batch=data+fsdp,length="; a bad name is a one-line ConfigError."""
    rules = dict(RULES)
    for entry in filter(None, (e.strip() for e in (text or "").split(","))):
        name, eq, target = (p.strip() for p in entry.partition("="))
        if not eq:
            raise ConfigError(f"config.{key}: '{entry}' is not logical_axis=mesh_axes (e.g. embed=fsdp)")
        if name not in RULES:
            near = difflib.get_close_matches(name, list(RULES), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f" (logical axes: {', '.join(RULES)})"
            raise ConfigError(f"config.{key}: unknown logical axis '{name}'{hint}")
        axes = [a.strip() for a in target.split("+")] if target.strip().lower() not in ("", "none") else []
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(f"config.{key}: '{name}={target}' names mesh axis '{axis}', not one of "
                                  f"{', '.join(MESH_AXES)}")
        if len(set(axes)) != len(axes):
            raise ConfigError(f"config.{key}: '{name}={target}' names a mesh axis twice")
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    return rules


def _named(sizes: Sequence[int], sep: str) -> str:
    """Mesh sizes as `data=2 fsdp=4 ...` for an error line (expert only when it is not 1)."""
    return sep.join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if a != "expert" or s != 1)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh over all processes' devices; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor, expert]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor, mesh.expert may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or n % known:
        raise ConfigError(f"mesh {_named(sizes, ' ')} does not divide the {n} available devices")
    sizes = [n // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise ConfigError(f"mesh {_named(sizes, ' x ')} = {int(np.prod(sizes))} devices, but {n} are available")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # hybrid/unknown topologies: plain order is still correct
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(m: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor, expert) mesh of a run's `mesh.*` settings `m` over `devices` (default: every
    process's)."""
    return make_mesh(m.data, m.fsdp, m.tensor, expert=m.expert, devices=devices)


def _size(mesh: Mesh, axis: str) -> int:
    """A mesh axis's size; 1 for an axis the mesh lacks (meshes built by hand with fewer axes)."""
    return mesh.shape.get(axis, 1)


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
            if t in used or _size(mesh, t) == 1:
                continue
            if dim % (size * _size(mesh, t)) == 0:
                kept.append(t)
                size *= _size(mesh, t)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def splits(mesh: Mesh | None, rules: dict | None, *logical: str) -> bool:
    """Whether `mesh` (under `rules`) splits any of these logical axes over more than one device."""
    if mesh is None:
        return False
    rules = RULES if rules is None else rules
    for name in logical:
        target = rules.get(name)
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if any(_size(mesh, a) > 1 for a in axes):
            return True
    return False


def logical_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names a parameter was declared with (None if it has none)."""
    return var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None


def state_shardings(state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
    """NamedSharding for every leaf of an (abstract) state, from its variables' logical axes.

    A quantized kernel's variable gets a tree of its arrays' shardings (blocks kept whole or a ConfigError).
    Also takes optimizer states: their moments are Variables carrying the param's axes; plain
    leaves (step counts) and leaves whose rank differs from their axes (Adafactor's factored
    moments) are replicated.
    """

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if hasattr(value, "shardings"):  # a quantized weight (ftjax.quant.weight) places each of its arrays
            return var.replace(value.shardings(mesh, rules))
        axes = logical_axes(var)
        if axes is None or len(axes) != len(value.shape):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    """Sharding of [batch, length] arrays: rows over the mesh axes `batch` maps to (data, fsdp, expert)."""
    rules = RULES if rules is None else rules
    target = rules.get("batch")
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept = tuple(t for t in targets if _size(mesh, t) > 1)
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


def active_mesh() -> tuple[Mesh, dict] | None:
    """The (mesh, rules) of the enclosing `activation_sharding`, or None outside one."""
    return _ACTIVE.get()


def active_platform() -> str:
    """'cpu', 'gpu' or 'tpu' of the mesh the enclosing `activation_sharding` traces for (a CPU host compiling for
    a TPU topology gets 'tpu'); outside one, the process's default backend."""
    active = _ACTIVE.get()
    return platform_of(active[0]) if active is not None else platform_of(None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))


def per_shard(fn, args: Sequence[jax.Array], axes: Sequence[Sequence[str | None]], out_axes: Sequence[str | None]):
    """`fn(*args)` on each device's shard under the active activation mesh (shard_map), for kernels that
    XLA cannot partition (Pallas/Mosaic calls); a plain call without a multi-device mesh. An axis that
    does not divide its dimension is not split (spec_for); the args' leading (batch) axes must agree."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return fn(*args)
    mesh, rules = active
    in_specs = tuple(spec_for(a, x.shape, mesh, rules) for a, x in zip(axes, args))
    out_spec = spec_for(out_axes, args[0].shape, mesh, rules)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)
