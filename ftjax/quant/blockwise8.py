"""8-bit blockwise quantization with a 256-value code, as bitsandbytes' CPU kernel does it.

NF4's double quantization stores the block scales this way. bitsandbytes (>= 0.50) rounds a
scaled value to one of 65536 grid points on [-1, 1] and looks the grid point's nearest code up
in a table; `quantize_blockwise8` reproduces that bit for bit (it is not always the nearest code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_GRID = 65536


@functools.cache
def _grid_table(code_bytes: bytes) -> np.ndarray:
    """Grid point -> index of the code entry it rounds to (bitsandbytes' `build_quantize_lut`)."""
    code = np.frombuffer(code_bytes, np.float32)
    midpoints = np.float32(0.5) * (code[:-1] + code[1:])
    i = np.arange(_GRID, dtype=np.float32)
    grid = np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_GRID - 1)
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


def _grid_index(v: np.ndarray) -> np.ndarray:
    """bitsandbytes' `norm_to_lut_index`: (clamp(v) + 1) * 0.5 * 65535 + 0.5, truncated.

    Its compiler fuses the last multiply and add into one FMA (one rounding), emulated in float64
    where the product is exact.
    """
    half = (np.clip(v, -1, 1).astype(np.float32) + np.float32(1.0)) * np.float32(0.5)
    return (half.astype(np.float64) * (_GRID - 1) + 0.5).astype(np.float32).astype(np.uint16)


def quantize_blockwise8(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes, float32 absmax per block) of a flat float32 array; the last block may be short."""
    x = np.asarray(x, np.float32).reshape(-1)
    n = x.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)
    padded[:n] = x
    rows = padded.reshape(blocks, blocksize)
    absmax = np.abs(rows).max(axis=1)
    inv = np.float32(1.0) / np.where(absmax > 0, absmax, np.float32(1.0))
    table = _grid_table(np.ascontiguousarray(code, np.float32).tobytes())
    q = table[_grid_index(rows * inv[:, None])]
    q[absmax == 0] = 0  # an all-zero block is written as code 0 with absmax 0
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise8(q: jax.Array, absmax: jax.Array, code: jax.Array, blocksize: int) -> jax.Array:
    """code[q] * absmax of its block, float32 (jit-able; q flat)."""
    block = jnp.arange(q.shape[-1]) // blocksize
    return jnp.asarray(code, jnp.float32)[q.astype(jnp.int32)] * absmax[..., block]
