"""NF4 with double quantization, as QLoRA / bitsandbytes store a frozen weight.

`quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")` on a torch weight
[out, in]: blocks of 64 consecutive inputs, each scaled by its absmax and rounded to the nearest
NF4 value (4-bit index, two per byte, high nibble first); the absmax values, less their mean
(`offset`), are quantized again to 8 bits in blocks of 256 with the dynamic map. Here the
packed codes and absmax codes are stored transposed, [in/2, out] and [in/64, out], so that
every leaf shards along the same axes as the kernel [in, out] it replaces.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError
from ftjax.quant.blockwise8 import dequantize_blockwise8, quantize_blockwise8
from ftjax.quant.codebooks import NF4_CODE, dynamic_map

BLOCK = 64  # weights per absmax, along the contraction axis
SCALE_BLOCK = 256  # absmax values per second-level (float32) scale


class NF4Blocks(NamedTuple):
    """One [in, out] kernel in NF4: packed codes, 8-bit absmax codes, their scales and offset."""

    codes: np.ndarray  # uint8 [in/2, out]: inputs 2j (high nibble) and 2j+1 (low nibble)
    absmax_codes: np.ndarray  # uint8 [in/64, out]
    absmax_scales: np.ndarray  # float32 [ceil(out*in/64 / 256)], over absmax in bitsandbytes' [out, in/64] order
    offset: np.ndarray  # float32 []: mean of the absmax values


def absmax_mean(absmax: np.ndarray) -> np.float32:
    """The float32 mean of the block absmax values, summed exactly then rounded once.

    bitsandbytes takes `absmax.mean()` in torch, whose float32 summation order depends on the
    CPU's vector width and thread count; this correctly rounded sum is within an ulp of it.
    """
    total = np.float32(np.asarray(absmax, np.float64).sum())
    return np.float32(total / np.float32(absmax.size))


def quantize_nf4(kernel: np.ndarray, offset: float | None = None) -> NF4Blocks:
    """NF4 blocks of a float kernel [in, out] (in a multiple of 64).

    `offset` overrides the absmax mean (to reproduce a given bitsandbytes quant state exactly).
    """
    kernel = np.asarray(kernel, np.float32)
    n_in, n_out = kernel.shape
    if n_in % BLOCK:
        raise ConfigError(f"NF4 needs the contraction size to be a multiple of {BLOCK}, got {n_in}")
    rows = kernel.T.reshape(n_out, n_in // BLOCK, BLOCK)  # bitsandbytes' [out, in] order
    absmax = np.abs(rows).max(axis=-1)
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(rows * inv[..., None], -1, 1)
    bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    q = np.searchsorted(bounds, scaled, side="left").astype(np.uint8).reshape(n_out, n_in)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    mean = absmax_mean(absmax) if offset is None else np.float32(offset)
    centred = (absmax - mean).astype(np.float32)
    absmax_codes, absmax_scales = quantize_blockwise8(centred, dynamic_map(), SCALE_BLOCK)
    return NF4Blocks(np.ascontiguousarray(packed.T), np.ascontiguousarray(absmax_codes.reshape(absmax.shape).T),
                     absmax_scales, np.asarray(mean, np.float32))


def dequantize_absmax(absmax_codes: jax.Array, absmax_scales: jax.Array, offset: jax.Array) -> jax.Array:
    """float32 absmax [in/64, out] from its 8-bit codes: code * scale, then + offset (two roundings)."""
    n_blocks, n_out = absmax_codes.shape
    flat = absmax_codes.T.reshape(-1)  # bitsandbytes' [out, in/64] order, where the scale blocks run
    scaled = dequantize_blockwise8(flat, absmax_scales, jnp.asarray(dynamic_map()), SCALE_BLOCK)
    return _add_rounded(scaled, offset).reshape(n_out, n_blocks).T


def _add_rounded(product: jax.Array, offset: jax.Array) -> jax.Array:
    """product + offset with the product rounded first, as bitsandbytes' two torch ops do.

    A plain `product + offset` is fused by XLA (CPU at -O1 and up, GPU) into one FMA, which
    rounds once and differs in the last bit; XLA does not fuse an elementwise producer into a
    dot, so the sum is taken as [product, offset] . [1, 1] at full float32 precision.
    """
    pair = jnp.stack([product, jnp.broadcast_to(offset, product.shape)], axis=-1)
    return jnp.dot(pair, jnp.ones(2, jnp.float32), precision=jax.lax.Precision.HIGHEST)


def dequantize_nf4(blocks: NF4Blocks, dtype=jnp.float32) -> jax.Array:
    """The kernel [in, out] NF4 stands for: NF4[code] * absmax of its block, computed in float32."""
    codes = jnp.asarray(blocks.codes)
    half, n_out = codes.shape
    absmax = dequantize_absmax(jnp.asarray(blocks.absmax_codes), jnp.asarray(blocks.absmax_scales),
                               jnp.asarray(blocks.offset))
    nibbles = jnp.stack([codes >> 4, codes & 0xF], axis=1).reshape(2 * half, n_out)
    values = jnp.asarray(NF4_CODE)[nibbles.astype(jnp.int32)].reshape(-1, BLOCK, n_out)
    return (values * absmax[:, None, :]).reshape(2 * half, n_out).astype(dtype)
