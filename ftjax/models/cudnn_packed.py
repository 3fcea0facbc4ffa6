"""cuDNN fused attention for training rows: one example a row through jax.nn's public API, packed rows (segment
ids) through cuDNN's packed layout (per-segment lengths and offsets), which only jax's private
`jax._src.cudnn.fused_attention_stablehlo` exposes. This file is the project's one private-jax import; what it
relies on is checked against the installed jax here (`packed_unavailable`) and by tests/test_cudnn_attention.py.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp

try:  # jax 0.10.2 and 0.11.x: dot_product_attention(query, key, value, bias, mask, q_seqlen, kv_seqlen,
    # q_offsets, kv_offsets, fp8_params, *, scale, mask_type, seed, dropout_rate, qkv_layout, ...)
    from jax._src.cudnn import fused_attention_stablehlo as _fa
except ImportError:  # pragma: no cover - a jax without it takes the Pallas alternative
    _fa = None

PACKED_ARGS = ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type", "qkv_layout")
# jax up to 0.11.0 scales the packed kv_offsets by the query heads, wrong for grouped-query attention (fixed by
# jax-ml/jax commit be78ee0f "Fix cuDNN packed-attention kv_offsets for GQA/MQA", after 0.11.0): there the kv
# heads are repeated up to the query heads first.
KV_OFFSETS_BY_KV_HEADS = (0, 11, 1)


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:3])


def packed_unavailable() -> str | None:
    """Why cuDNN's packed layout cannot be called with the installed jax (None: it can)."""
    if _fa is None:
        return f"jax {jax.__version__} has no jax._src.cudnn.fused_attention_stablehlo"
    params = inspect.signature(_fa.dot_product_attention).parameters
    missing = [a for a in PACKED_ARGS if a not in params]
    if missing or not hasattr(getattr(_fa, "MaskType", None), "PADDING_CAUSAL"):
        return (f"jax {jax.__version__}'s fused_attention_stablehlo.dot_product_attention lacks "
                f"{', '.join(missing) or 'MaskType.PADDING_CAUSAL'}")
    return None


def repeats_kv_heads(heads: int, kv_heads: int) -> bool:
    """Whether grouped kv heads must be repeated for the packed layout with this jax (see KV_OFFSETS_BY_KV_HEADS)."""
    return kv_heads < heads and jax_version() < KV_OFFSETS_BY_KV_HEADS


def gpu_kernel(packed: bool, max_segments: int) -> tuple[str, str | None]:
    """The kernel the `cudnn` backend gives training rows, and why it is not cuDNN (None: it is): one example a
    row -> "cudnn"; packed rows of at most `max_segments` -> "cudnn_packed"; packed rows without that bound, or
    a jax without the packed layout -> "pallas_gpu", the Triton flash kernel with segment ids. Until a GPU has
    timed cudnn_packed against pallas_gpu on packed rows, cuDNN is the choice wherever it can run."""
    if not packed or max_segments == 1:
        return "cudnn", None
    if max_segments < 1:
        return "pallas_gpu", "packed rows without a bound on their segments (model max_segments=0)"
    why = packed_unavailable()
    return ("pallas_gpu", why) if why is not None else ("cudnn_packed", None)


def segment_layout(segment_ids: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of rows [B, T] whose segments are contiguous runs numbered 1, 2, ... in order (0 =
    padding), as ftjax's packers lay them out: lengths [B, slots] and start offsets [B, slots + 1], both int32 and
    -1 where a row has no such segment."""
    ids = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
    lengths = jnp.sum(segment_ids[:, :, None] == ids, axis=1, dtype=jnp.int32)
    starts = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths
    present = lengths > 0
    seqlen = jnp.where(present, lengths, -1)
    offsets = jnp.pad(jnp.where(present, starts, -1), ((0, 0), (0, 1)), constant_values=-1)
    return seqlen.astype(jnp.int32), offsets.astype(jnp.int32)


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float,
                     slots: int) -> jax.Array:
    """Causal attention within each segment of packed rows [B, T, N, H] (bf16/fp16), at most `slots` segments a
    row. Positions outside every segment (padding) are zeroed going in and coming out: cuDNN leaves them undefined."""
    n, kh = q.shape[2], k.shape[2]
    if repeats_kv_heads(n, kh):
        k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
    seqlen, offsets = segment_layout(segment_ids, slots)
    inside = ((segment_ids > 0) & (segment_ids <= slots))[:, :, None, None]
    zero = lambda x: jnp.where(inside, x, jnp.zeros((), x.dtype))  # noqa: E731
    out = _fa.dot_product_attention(zero(q), zero(k), zero(v), q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets,
                                    kv_offsets=offsets, scale=scale, mask_type=_fa.MaskType.PADDING_CAUSAL,
                                    qkv_layout="BTNH")
    return zero(out)


def row_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, window: int | None) -> jax.Array:
    """cuDNN fused attention, causal (and windowed) by the kernel's own masking, one example a row: no segment ids."""
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                        implementation="cudnn")
