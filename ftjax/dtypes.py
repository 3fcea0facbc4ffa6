"""Dtype names and casts shared by loading, training and export: one rule for the frozen weights' dtype."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError


def dtype_name(dtype: Any) -> str:
    """'float32' for jnp.float32, 'bfloat16', ...; ConfigError for a name JAX does not know."""
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ConfigError(f"unknown dtype {dtype!r} (use e.g. 'float32' or 'bfloat16')") from None


def cast_floats(state: Any, dtype: Any) -> Any:
    """Floating leaves in `dtype` (e.g. bf16 frozen weights), quantized weights as they are; None keeps all."""
    if dtype is None:
        return state
    dt = jnp.dtype(dtype)
    quantized = lambda x: hasattr(x, "dequantize")  # noqa: E731  (ftjax.quant.weight: scales stay float32)
    return jax.tree.map(lambda x: x if quantized(x) else x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, state, is_leaf=quantized)


def frozen_dtype(frozen: str, param_dtype: str) -> str | None:
    """The dtype the frozen (non-trained) weights are cast to (`train.frozen_dtype`); None when it is the
    parameter dtype already (no cast)."""
    return None if frozen == param_dtype else frozen
