"""int8 absmax quantization per output channel: w ≈ q * scale, scale = max|w[:, o]| / 127."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Int8Channels(NamedTuple):
    """One [in, out] kernel in int8: codes [in, out] and one float32 scale per output channel."""

    codes: np.ndarray  # int8 [in, out]
    scales: np.ndarray  # float32 [out]


def quantize_int8(kernel: np.ndarray) -> Int8Channels:
    """Round w / scale to the nearest integer (ties to even) in float64; |w - q*scale| <= scale/2."""
    kernel = np.asarray(kernel, np.float32)
    scales = (np.abs(kernel).max(axis=0) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1)).astype(np.float64)
    codes = np.clip(np.rint(kernel.astype(np.float64) / safe), -127, 127).astype(np.int8)
    return Int8Channels(codes, scales)


def dequantize_int8(channels: Int8Channels, dtype=jnp.float32) -> jax.Array:
    """codes * scale in float32 (one rounding), then cast to `dtype`."""
    codes, scales = jnp.asarray(channels.codes), jnp.asarray(channels.scales)
    return (codes.astype(jnp.float32) * scales).astype(dtype)
