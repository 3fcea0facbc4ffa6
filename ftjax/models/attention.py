"""One attention interface, several kernels: `attention(q, k, v, rows, ...)` -> [B, T, N, H].

Backends (`implementation`):
  xla         masked softmax in plain XLA ops (on CPU the grouped form below, tuned there); the only
              backend that builds a [B, 1, T, S] mask, and the fallback of every other one
  cudnn       cuDNN fused attention (GPU, bf16/fp16), ftjax/models/cudnn_packed.py: rows of one example
              (`packed=False`) with the kernel's own causal / window masking; packed rows (segment ids, at
              most `max_segments` a row) in cuDNN's packed layout ("cudnn_packed"); packed rows without
              that bound, or where the installed jax lacks the layout, go to the Pallas GPU kernel
  pallas_gpu  jax.experimental.pallas.ops.gpu.attention (Triton flash attention with segment ids)
  splash      jax.experimental.pallas.ops.tpu.splash_attention (segment ids, soft-cap, causal/local)
The Pallas kernels run in interpret mode off their platform (how the CPU tests check them); the platform is the
traced mesh's (ftjax.sharding.active_platform), so a CPU host compiling for a TPU topology builds the Mosaic kernel. A backend
that lacks a feature of a call (a window, a soft-cap, a KV cache, fp32) falls back to `xla` and logs so once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from ftjax.models import cudnn_packed
from ftjax.sharding import active_platform, per_shard

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_gpu", "splash")
KERNELS = {  # what a kernel name of `choose_kernel` runs, for log lines and benchmark records
    "xla": "xla (masked softmax)", "splash": "splash (mosaic)", "pallas_gpu": "pallas_gpu (triton, segment ids)",
    "cudnn": "cudnn (fused attention, one example a row)",
    "cudnn_packed": "cudnn_packed (packed layout, segment offsets)"}
_log = logging.getLogger(__name__)
_said: set[tuple[str, str]] = set()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """Which keys a query may see: segment ids [B, T] / [B, S] and slots; slots None = training rows
    (query i and key i are slot i, T == S), the layout the kernels take."""

    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    q_slots: jax.Array | None = None
    kv_slots: jax.Array | None = None

    @property
    def training(self) -> bool:
        return self.q_slots is None


def attention_mask(q_segment_bt, q_slot_bt, kv_segment_bs, kv_slot_bs, sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same segment and causal by slot (and within the window)."""
    same = q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    causal = kv_slot_bs[:, None, :] <= q_slot_bt[:, :, None]
    mask = same & causal
    if sliding_window is not None:
        mask &= (q_slot_bt[:, :, None] - kv_slot_bs[:, None, :]) < sliding_window
    return mask[:, None, :, :]


def rows_mask(rows: Rows, t: int, s: int, window: int | None) -> jax.Array:
    """The [B, 1, T, S] mask of `rows` (XLA backend only)."""
    b = rows.q_segment_ids.shape[0]
    q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if rows.q_slots is None else rows.q_slots
    kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if rows.kv_slots is None else rows.kv_slots
    return attention_mask(rows.q_segment_ids, q_slots, rows.kv_segment_ids, kv_slots, window)


def causal_blocks(t: int, max_blocks: int = 8, min_block: int = 64) -> int:
    """Query blocks for causal block skipping: the most (up to `max_blocks`) that tile the sequence
    in blocks of at least `min_block` tokens (256 tokens: 4 blocks of 64), else 1."""
    for n in (8, 4, 2):
        if n <= max_blocks and t % n == 0 and t // n >= min_block:
            return n
    return 1


def _cap(scores: jax.Array, softcap: float | None) -> jax.Array:
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def grouped_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask: jax.Array, *,
                      blocks: int = 1, scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Masked softmax attention with grouped-query heads folded into the rows: [B, T, N, H] out (CPU-tuned).

    Queries are laid out once as [B, K, T·G, H] (rows t-major, the G query heads of a kv head next to
    each other), so a causal query block is a contiguous row range: `blocks` > 1 (causal masks with
    query i at slot i only) splits the rows and skips the keys after each block, without the per-block
    slicing and transposes of jax.nn.dot_product_attention called block by block. The softmax is one
    pass (max, exp, sum), normalized after the value matmul ([T·G, H] divides instead of [T·G, S]);
    the max is a constant for autodiff. `mask` [B, 1, T, S] is boolean; a fully masked row gets
    uniform weights, as jax.nn's does. Same results to fp32 rounding (not bit for bit).
    """
    b, t, n, h = q_btnh.shape
    s, kh = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kh
    acc = jnp.promote_types(q_btnh.dtype, jnp.float32)
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = q_btnh.reshape(b, t, kh, g, h)
    q = q.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    k, v = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)  # [B, K, S, H]
    size = t // blocks
    outs = []
    for i, qi in enumerate(jnp.split(q, blocks, axis=2)):  # split, not slices: its gradient is one concat
        keys = s if blocks == 1 else (i + 1) * size
        scores = jnp.einsum("bkrh,bksh->bkrs", qi, k[:, :, :keys], preferred_element_type=acc)
        scores = _cap(scores.reshape(b, kh, size, g, keys) * jnp.asarray(scale, acc), softcap)
        m = mask[:, :, i * size:(i + 1) * size, :keys][:, :, :, None, :]
        scores = jnp.where(m, scores, jnp.asarray(jnp.finfo(acc).min, acc))
        scores = scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        p = jnp.exp(scores)
        denom = jnp.sum(p, axis=-1, keepdims=True).reshape(b, kh, size * g, 1)
        o = jnp.einsum("bkrs,bksh->bkrh", p.reshape(b, kh, size * g, keys).astype(v.dtype), v[:, :, :keys],
                       preferred_element_type=acc)
        outs.append((o / denom).astype(q_btnh.dtype))
    o = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=2)
    return o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _xla(q, k, v, rows: Rows, scale: float, softcap: float | None, window: int | None) -> jax.Array:
    """Masked attention in XLA ops: the CPU-tuned grouped form on CPU, else the plain einsum path."""
    t, s = q.shape[1], k.shape[1]
    mask = rows_mask(rows, t, s, window)
    blocks = causal_blocks(t) if rows.training else 1
    if active_platform() == "cpu" and (blocks > 1 or softcap is not None):
        return grouped_attention(q, k, v, mask, blocks=blocks, scale=scale, softcap=softcap)
    if softcap is None:  # decode and short rows keep jax.nn's numerics
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    return grouped_attention(q, k, v, mask, scale=scale, softcap=softcap)


def fallback(implementation: str, reason: str, instead: str = "xla") -> None:
    """Log once per (backend, reason) that a call went to another kernel (the XLA backend) instead."""
    if (implementation, reason) not in _said:
        _said.add((implementation, reason))
        _log.warning("attention: %s does not support %s; using %s for these calls", implementation, reason, instead)


def _block(n: int, sizes=(512, 256, 128)) -> int | None:
    return next((b for b in sizes if n % b == 0), None)


def _pallas_gpu(q, k, v, rows: Rows, *, scale: float) -> jax.Array:
    """Triton flash attention with segment ids (causal, one segment array: T == S); GQA by repeating kv heads."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    g = q.shape[2] // k.shape[2]
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    bq = _block(q.shape[1], (128, 64))
    sizes = gpu_attention.BlockSizes(block_q=bq, block_k=bq, block_q_dkv=bq, block_kv_dkv=bq, block_q_dq=bq,
                                     block_kv_dq=bq)
    return gpu_attention.mha(q, k, v, rows.q_segment_ids, sm_scale=scale, causal=True, block_sizes=sizes,
                             interpret=active_platform() != "gpu")


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, s: int, heads: int, window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, s)) if window is None else sm.LocalMask((t, s), (window - 1, 0), offset=0)
    bq, bkv = _block(t), _block(s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes,
                              attn_logits_soft_cap=softcap, interpret=interpret), sk.SegmentIds


def _splash(q, k, v, rows: Rows, *, scale: float, softcap: float | None, window: int | None) -> jax.Array:
    """Splash attention per row (vmapped over the batch); heads-major layout, queries pre-scaled."""
    t, n, s = q.shape[1], q.shape[2], k.shape[1]
    kernel, segment_ids = _splash_kernel(t, s, n, window, softcap, active_platform() != "tpu")
    qs = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    out = jax.vmap(lambda q1, k1, v1, qseg, kvseg: kernel(q1, k1, v1, segment_ids=segment_ids(qseg, kvseg)))(
        qs, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), rows.q_segment_ids, rows.kv_segment_ids)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _unsupported(kernel: str, q, k, rows: Rows, softcap, window) -> str | None:
    """Why `kernel` cannot take this call (None: it can)."""
    if not rows.training:
        return "explicit slots (KV-cache decode)"
    if kernel == "splash":
        if _block(q.shape[1]) is None or _block(k.shape[1]) is None:
            return "lengths that are not a multiple of 128"
        return None
    if softcap is not None:
        return "a logit soft-cap"
    if kernel == "pallas_gpu":
        if window is not None:
            return "a sliding window"
        if _block(q.shape[1], (128, 64)) is None:
            return "lengths that are not a multiple of 64"
        return None
    if q.dtype not in (jnp.bfloat16, jnp.float16):  # cudnn, cudnn_packed
        return f"{q.dtype} inputs (bf16/fp16 only)"
    if kernel == "cudnn_packed" and window is not None:
        return "a sliding window on packed rows"
    return None


def choose_kernel(implementation: str, q, k, rows: Rows, *, softcap=None, window=None, packed: bool = True,
                  max_segments: int = 0, log: bool = True) -> str:
    """The kernel (a key of KERNELS) that takes this call: `implementation`, for cudnn the one for the rows'
    layout (`cudnn_packed.gpu_kernel`), or xla where that kernel lacks a feature of the call (logged once)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "xla":
        return "xla"
    kernel = implementation
    if implementation == "cudnn":
        kernel, why = cudnn_packed.gpu_kernel(packed, max_segments)
        if why is not None and log and rows.training:
            fallback(implementation, why, kernel)
    reason = _unsupported(kernel, q, k, rows, softcap, window)
    if reason is not None:
        if log:
            fallback(kernel, reason)
        return "xla"
    return kernel


def kernel_names(implementation: str, *, dtype, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                 windows=(None,), softcap=None, max_segments: int = 0) -> str:
    """What a model's training rows run (KERNELS' descriptions, one per distinct choice over its windows)."""
    q = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((1, seq_len, kv_heads, head_dim), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    names = [choose_kernel(implementation, q, k, Rows(seg, seg), softcap=softcap, window=w,
                           packed=max_segments != 1, max_segments=max_segments, log=False) for w in windows]
    return ", ".join(KERNELS[n] for n in dict.fromkeys(names))


def attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, rows: Rows, *, scale: float | None = None,
              softcap: float | None = None, window: int | None = None, implementation: str = "xla",
              packed: bool = True, max_segments: int = 0) -> jax.Array:
    """Causal grouped-query attention [B, T, N, H] over `rows` (segment ids, slots).

    `window` (static): a query sees the keys at most window - 1 slots before it. `softcap`: scores become
    softcap·tanh(scores / softcap) after scaling. `packed=False` promises one segment per row (cuDNN then
    needs no segment ids); `max_segments` > 0 promises at most that many segments a row (cuDNN's packed layout
    reserves a slot for each). Unknown backends raise ValueError.
    """
    scale = 1.0 / math.sqrt(q_btnh.shape[-1]) if scale is None else float(scale)
    kernel = choose_kernel(implementation, q_btnh, k_bskh, rows, softcap=softcap, window=window, packed=packed,
                           max_segments=max_segments)
    if kernel == "splash":
        return _on_shards(functools.partial(_splash, scale=scale, softcap=softcap, window=window), q_btnh,
                          k_bskh, v_bskh, rows)
    if kernel == "pallas_gpu":
        return _on_shards(functools.partial(_pallas_gpu, scale=scale), q_btnh, k_bskh, v_bskh, rows)
    if kernel == "cudnn":  # XLA partitions cuDNN's custom calls itself
        return cudnn_packed.row_attention(q_btnh, k_bskh, v_bskh, scale=scale, window=window)
    if kernel == "cudnn_packed":
        return cudnn_packed.packed_attention(q_btnh, k_bskh, v_bskh, rows.q_segment_ids, scale=scale,
                                             slots=max_segments)
    return _xla(q_btnh, k_bskh, v_bskh, rows, scale, softcap, window)


def _on_shards(kernel, q, k, v, rows: Rows) -> jax.Array:
    """A Pallas kernel per device shard (XLA cannot partition it): rows over the batch axes, kv heads (with
    their query heads, grouped as [B, T, K, G, H] so both split alike) over the tensor axis."""
    b, t, n, h = q.shape
    kh = k.shape[2]

    def local(q5, k, v, q_seg, kv_seg):
        out = kernel(q5.reshape(*q5.shape[:2], -1, h), k, v, Rows(q_seg, kv_seg))
        return out.reshape(q5.shape)

    heads = ("batch", "length", "act_kv", None, None)
    out = per_shard(local, (q.reshape(b, t, kh, n // kh, h), k, v, rows.q_segment_ids, rows.kv_segment_ids),
                    (heads, ("batch", "length", "act_kv", None), ("batch", "length", "act_kv", None),
                     ("batch", None), ("batch", None)), heads)
    return out.reshape(b, t, n, h)
