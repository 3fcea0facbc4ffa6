"""One tensor at a time from a sharded model to the host: the building block of every export.

A whole model is never gathered: each parameter (each layer's slice of a stacked one) is cut
out, cast and transposed on the devices, then fetched alone, so host memory holds one tensor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ftjax.quant.weight import QuantizedWeight


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of one array on this host (all processes must call it for a multi-host array)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every process holds all of it
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _layer(x: jax.Array | QuantizedWeight, layer: jax.Array | None) -> jax.Array | QuantizedWeight:
    """Layer `layer` of a stacked param (every array of a quantized one), or the whole param when None."""
    if layer is None:
        return x
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), x)


def _dense(x: jax.Array | QuantizedWeight) -> jax.Array:
    """A quantized kernel's value (a quantized base's weights are exported dequantized)."""
    return x.dequantize() if isinstance(x, QuantizedWeight) else x


def _index(i: int | None) -> np.int32 | None:
    """A layer or expert index as a host scalar (replicated on every process), or None."""
    return None if i is None else np.int32(i)


@functools.partial(jax.jit, static_argnames=("dtype", "transpose"))
def _slice(x: jax.Array, layer: jax.Array | None, expert: jax.Array | None, *, dtype: str,
           transpose: bool) -> jax.Array:
    x = _dense(_layer(_layer(x, layer), expert)).astype(dtype)
    return x.T if transpose else x


def tensor(x: jax.Array, layer: int | None, dtype: str, transpose: bool = False,
           expert: int | None = None) -> np.ndarray:
    """Layer `layer` of a stacked param (or the whole param when None), cast and maybe transposed;
    `expert` then picks one expert's matrix of a stacked [E, in, out] experts param."""
    return to_host(_slice(x, _index(layer), _index(expert), dtype=dtype, transpose=transpose))


@functools.partial(jax.jit, static_argnames=("replicated",))
def _layer_replicated(x: jax.Array, layer: jax.Array | None, expert: jax.Array | None, *,
                      replicated: NamedSharding | None) -> jax.Array:
    """One layer's slice (or the whole param; `expert` then picks one expert's), whole on every device: merges
    then do the same arithmetic on the same shapes however the model is sharded (a partitioned merge can round
    the last bit differently)."""
    x = _layer(_layer(x, layer), expert)
    return _dense(x if replicated is None else jax.lax.with_sharding_constraint(x, replicated))


@functools.partial(jax.jit, static_argnames=("scale", "dtype", "transpose", "columns"))
def _merged(kernel: jax.Array, a: jax.Array, b: jax.Array, *, scale: float, dtype: str, transpose: bool,
            columns: tuple[int, int] | None) -> jax.Array:
    """W + scale·A·B in fp32 (what `ftjax.lora.merge_lora` computes), then cast; `columns` keeps that slice of
    A·B's outputs (an adapter over a fused output, e.g. the experts' gate|up, split between its kernels), cut
    after the whole product as the merge cuts it (a product over fewer columns can round differently)."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    delta = delta if columns is None else delta[..., columns[0]:columns[1]]
    w = (kernel.astype(jnp.float32) + scale * delta).astype(dtype)
    return w.T if transpose else w


def merged_tensor(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, layer: int | None, dtype: str,
                  transpose: bool = False, expert: int | None = None,
                  columns: tuple[int, int] | None = None) -> np.ndarray:
    """One layer's kernel with its LoRA update folded in, cast and maybe transposed; the same bytes on any
    sharding of the model (the three slices are made whole on every device before the merge). `expert` picks
    one expert of stacked [E, ...] experts and their per-expert adapter; `columns` a slice of B's outputs."""
    sharding = getattr(kernel, "sharding", None)
    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    parts = [_layer_replicated(x, _index(layer), _index(expert), replicated=replicated) for x in (kernel, a, b)]
    return to_host(_merged(*parts, scale=float(scale), dtype=dtype, transpose=transpose, columns=columns))


def barrier(name: str) -> None:
    """Every host returns only once every host got here (after process 0 has written an export)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
