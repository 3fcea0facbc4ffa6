"""GGUF (ggml) blocks -> float32 in jnp, value for value as `gguf.quants.dequantize`.

Takes the raw block bytes as a GGUF file stores them (uint8 [..., type_size] per block) and is
jit-able, so a layer can keep its weights in the file's own format and dequantize one layer
inside the scan. Every product here is exact in float32 (an f16 scale, or f16 x 6-bit scale,
times an integer of at most 6 bits), so XLA fusing a multiply and add into one FMA rounds the
same as numpy's two steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

QK_K = 256
# ggml type name -> (values per block, bytes per block)
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}


def _f16(b: jax.Array) -> jax.Array:
    """Little-endian f16 from 2 bytes [..., 2] -> float32 [..., 1]."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[..., None]


def _nibbles(qs: jax.Array) -> jax.Array:
    """[n, 16k] bytes -> [n, 32k] values: each run of bytes' low nibbles, then their high nibbles."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: jax.Array, count: int) -> jax.Array:
    """Bit i of the little-endian word qh [n, 4] for i < count, as uint8 [n, count]."""
    word = lax.bitcast_convert_type(qh, jnp.uint32)[..., None]
    return ((word >> jnp.arange(count, dtype=jnp.uint32)) & 1).astype(jnp.uint8)


def _f32(b):
    return lax.bitcast_convert_type(b, jnp.float32)[:, None]


def _f16_values(b):
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[:, None]


def _bf16(b):
    return lax.bitcast_convert_type(b, jnp.bfloat16).astype(jnp.float32)[:, None]


def _q4_0(b):
    return _f16(b[:, 0:2]) * (_nibbles(b[:, 2:]).astype(jnp.int8) - 8).astype(jnp.float32)


def _q4_1(b):
    return _f16(b[:, 0:2]) * _nibbles(b[:, 4:]).astype(jnp.float32) + _f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4)
    return _f16(b[:, 0:2]) * (q.astype(jnp.int8) - 16).astype(jnp.float32)


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4)
    return _f16(b[:, 0:2]) * q.astype(jnp.float32) + _f16(b[:, 2:4])


def _q8_0(b):
    return lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32) * _f16(b[:, 0:2])


def _k_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_groups(b: jax.Array, high: jax.Array | None) -> jax.Array:
    """Q4_K / Q5_K: eight groups of 32 (low nibbles of 32 bytes, then their high nibbles), 5th bit from qh."""
    n = b.shape[0]
    qs = b[:, -128:].reshape(n, 4, 1, 32) >> jnp.array([0, 4], jnp.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32)
    if high is not None:
        q = q | (((high.reshape(n, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 8, 1)) & 1) << 4)
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.astype(jnp.float32))[..., None]
    dm = (_f16(b[:, 2:4]) * mn.astype(jnp.float32))[..., None]
    return (d * q.astype(jnp.float32) - dm).reshape(n, QK_K)


def _q4_k(b):
    return _k_groups(b, None)


def _q5_k(b):
    return _k_groups(b, b[:, 16:48])


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64) >> jnp.array([0, 4], jnp.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).astype(jnp.int8) - 32).reshape(n, 16, 16).astype(jnp.float32)
    scales = lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16(b[:, 208:210]) * scales)[..., None]
    return (d * q).reshape(n, QK_K)


_DEQUANTIZE = {"F32": _f32, "F16": _f16_values, "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
               "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize_blocks(blocks: jax.Array, qtype: str) -> jax.Array:
    """uint8 [..., n_blocks, type_size] (a file's rows, cut into blocks) -> float32 [..., n_blocks * block_size]."""
    if qtype not in _DEQUANTIZE:
        raise ValueError(f"ggml type {qtype} has no jnp dequantizer (have: {', '.join(_DEQUANTIZE)})")
    block, size = BLOCKS[qtype]
    blocks = jnp.asarray(blocks, jnp.uint8)
    if blocks.shape[-1] != size:
        raise ValueError(f"{qtype} blocks are {size} bytes, got a last axis of {blocks.shape[-1]}")
    lead = blocks.shape[:-2]
    out = _DEQUANTIZE[qtype](blocks.reshape(-1, size))
    return out.reshape(*lead, blocks.shape[-2] * block)
