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


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of one array on this host (all processes must call it for a multi-host array)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnames=("dtype", "transpose"))
def _slice(x: jax.Array, layer: jax.Array | None, *, dtype: str, transpose: bool) -> jax.Array:
    if layer is not None:
        x = jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
    x = x.astype(dtype)
    return x.T if transpose else x


def tensor(x: jax.Array, layer: int | None, dtype: str, transpose: bool = False) -> np.ndarray:
    """Layer `layer` of a stacked param (or the whole param when None), cast and maybe transposed."""
    idx = None if layer is None else np.int32(layer)  # host scalar: replicated on every process
    return to_host(_slice(x, idx, dtype=dtype, transpose=transpose))


def merged_tensor(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, layer: int | None, dtype: str,
                  transpose: bool = False) -> np.ndarray:
    """One layer's kernel with its LoRA update folded in (W + scale·A·B in fp32), cast and maybe transposed.

    The three fp32 pieces are fetched and merged on the host, so the bytes do not depend on how the model
    is sharded (a device-side merge of differently partitioned pieces can round the last bit differently).
    """
    w, a, b = (tensor(x, layer, "float32") for x in (kernel, a, b))
    merged = (w + np.float32(scale) * np.matmul(a, b)).astype(np.float32).astype(dtype)
    return np.ascontiguousarray(merged.T) if transpose else merged


def barrier(name: str) -> None:
    """Every host returns only once every host got here (after process 0 has written an export)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
