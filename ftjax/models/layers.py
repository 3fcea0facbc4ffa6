"""Decoder building blocks: RMSNorm, rotary embeddings, attention with segment ids, gated MLP.

Parameters carry logical axis names (`logical_axes` metadata); `ftjax.sharding` places them.
Every module may be built with a leading `stack` of layers (params [L, ...]) and is then
called on one layer's slice inside `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax.sharding import _ACTIVE, constrain


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal", stddev=0.02) -> nnx.Param:
    """A parameter with its logical axes; rngs=None gives zeros/ones only (shape-only builds)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (stddev * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, as transformers' Llama does, then scaled in the input dtype."""

    def __init__(self, dim: int, *, eps: float, stack: tuple = (), param_dtype=jnp.float32):
        self.eps = eps
        self.scale = _param(None, (*stack, dim), ("layers",) * len(stack) + ("norm",), param_dtype, "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ lora(x)); kernel [in, out]. `lora` is set from outside by ftjax.lora."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 stack: tuple = (), dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        lead = ("layers",) * len(stack)
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.kernel = _param(rngs, (*stack, in_features, out_features), lead + tuple(axes), param_dtype)
        self.bias = _param(None, (*stack, out_features), lead + (axes[1],), param_dtype, "zeros") if use_bias else None
        self.lora: nnx.Module | None = None

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        # Rows flattened to 2-D: the weight gradient is then one plain [in, rows] x [rows, out] GEMM;
        # with [B, T] rows XLA CPU transposes the activations for it (a slow copy every layer).
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x2, rng).astype(y.dtype)
        return y.reshape(*lead, y.shape[-1])


def _unsharded(*logical: str) -> bool:
    """Whether the active activation-sharding mesh (if any) splits none of these logical axes."""
    active = _ACTIVE.get()
    if active is None:
        return True
    mesh, rules = active
    for name in logical:
        axes = rules.get(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if any(mesh.shape[a] > 1 for a in axes):
            return False
    return True


def fused_linears(x: jax.Array, linears: tuple, rngs: tuple) -> list[jax.Array]:
    """Several linears on the same input as one GEMM: x @ [W1 | W2 | ...], split afterwards.

    The stored parameters keep their layout (HF import/export, PEFT, sharding rules and checkpoints
    see separate kernels); only the step concatenates them, a few MB per layer. Their LoRA adapters
    become one GEMM too: x @ [A1 | A2 | ...] (the saved `lora_hidden`) times a block-diagonal
    [B1·s1, B2·s2, ...] — unless adapter dropout is active, which gives each adapter its own input.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    sizes = [lin.out_features for lin in linears]
    y = x2 @ jnp.concatenate([lin.kernel[...].astype(lin.dtype) for lin in linears], axis=-1)
    if any(lin.bias is not None for lin in linears):
        y = y + jnp.concatenate([jnp.zeros((lin.out_features,), lin.dtype) if lin.bias is None
                                 else lin.bias[...].astype(lin.dtype) for lin in linears])
    adapters = [(i, lin.lora) for i, lin in enumerate(linears) if lin.lora is not None]
    dropout = any(lo.dropout > 0.0 and rngs[i] is not None for i, lo in adapters)
    if adapters and not dropout and all(hasattr(lo, "lora_a") for _, lo in adapters):
        a = jnp.concatenate([lo.lora_a[...].astype(x2.dtype) for _, lo in adapters], axis=-1)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        rows = []
        for i, lo in adapters:
            b = lo.lora_b[...].astype(x2.dtype) * jnp.asarray(lo.scale, x2.dtype)
            rows.append(jnp.pad(b, ((0, 0), (offsets[i], total - offsets[i] - sizes[i]))))
        y = y + (checkpoint_name(x2 @ a, "lora_hidden") @ jnp.concatenate(rows, axis=0)).astype(y.dtype)
        adapters = []
    outs = jnp.split(y, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)], axis=-1)
    for i, lo in adapters:
        outs[i] = outs[i] + lo(x2, rngs[i]).astype(y.dtype)
    return [o.reshape(*lead, o.shape[-1]) for o in outs]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `kind` is default, linear or llama3 (transformers' rope types)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> jax.Array:
    """Inverse frequencies, including Llama 3.1 style frequency-dependent scaling."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_sin_cos(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin/cos [B, T, head_dim] in fp32 for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x_btnh: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding (the HF layout of q/k rows)."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    sin, cos = sin[:, :, None, :].astype(x_btnh.dtype), cos[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin


def attention_mask(q_segment_bt, q_slot_bt, kv_segment_bs, kv_slot_bs, sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same segment and causal by slot (and within the window)."""
    same = q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    causal = kv_slot_bs[:, None, :] <= q_slot_bt[:, :, None]
    mask = same & causal
    if sliding_window is not None:
        mask &= (q_slot_bt[:, :, None] - kv_slot_bs[:, None, :]) < sliding_window
    return mask[:, None, :, :]


def causal_blocks(t: int, max_blocks: int = 8, min_block: int = 64) -> int:
    """Query blocks for causal block skipping: the most (up to `max_blocks`) that tile the sequence
    in blocks of at least `min_block` tokens (256 tokens: 4 blocks of 64), else 1."""
    for n in (8, 4, 2):
        if n <= max_blocks and t % n == 0 and t // n >= min_block:
            return n
    return 1


def grouped_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask: jax.Array, *,
                      blocks: int = 1) -> jax.Array:
    """Masked softmax attention with grouped-query heads folded into the rows: [B, T, N, H] out.

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
    q = q_btnh.reshape(b, t, kh, g, h)
    q = q.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    k, v = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)  # [B, K, S, H]
    size = t // blocks
    outs = []
    for i, qi in enumerate(jnp.split(q, blocks, axis=2)):  # split, not slices: its gradient is one concat
        keys = s if blocks == 1 else (i + 1) * size
        scores = jnp.einsum("bkrh,bksh->bkrs", qi, k[:, :, :keys], preferred_element_type=acc)
        scores = scores.reshape(b, kh, size, g, keys) * jnp.asarray(1.0 / math.sqrt(h), acc)
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


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static attention shape settings taken from the model config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    implementation: str = "xla"


class Attention(nnx.Module):
    """Grouped-query self-attention: `grouped_attention` for causal training rows on XLA, else
    jax.nn.dot_product_attention (decode, short rows, cudnn)."""

    def __init__(self, cfg: AttentionConfig, *, stack: tuple = (), dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        kw: dict[str, Any] = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(d, k * h, axes=("embed", "kv"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, k * h, axes=("embed", "kv"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, stack=stack, param_dtype=param_dtype)
            self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, stack=stack, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x_btd, sin, cos, rngs=(None, None, None)):
        """q [B,T,N,H] and k, v [B,T,K,H] with q/k-norm and rotary applied."""
        c = self.cfg
        b, t, _ = x_btd.shape
        # One GEMM [D, (N + 2K)·H] instead of three (SmolLM2's k/v ones, 192 wide, run at about half the
        # rate of wide ones on CPU); not when the tensor axis splits the heads (the concat would gather).
        if _unsharded("heads", "kv"):
            q, k, v = fused_linears(x_btd, (self.q_proj, self.k_proj, self.v_proj), tuple(rngs))
        else:
            q, k, v = self.q_proj(x_btd, rngs[0]), self.k_proj(x_btd, rngs[1]), self.v_proj(x_btd, rngs[2])
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, sin, cos), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, sin, cos), ("batch", "length", "act_kv", None))
        v = constrain(v, ("batch", "length", "act_kv", None))
        return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")

    def attend(self, q_btnh, k_bskh, v_bskh, mask, o_rng=None, *, causal: bool = False) -> jax.Array:
        """Masked softmax attention and the output projection.

        `causal` (query i and key i are the same slot and the mask is causal, as in training) lets the
        XLA path skip key blocks that lie wholly after a query block: 3/8 less attention work at 4 blocks.
        """
        b, t = q_btnh.shape[:2]
        impl = None if self.cfg.implementation == "xla" else self.cfg.implementation
        blocks = causal_blocks(t) if causal and impl is None and k_bskh.shape[1] == t else 1
        if blocks > 1:  # training-length causal rows; decode and short rows keep jax.nn's numerics
            out = grouped_attention(q_btnh, k_bskh, v_bskh, mask, blocks=blocks)
        else:
            out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, implementation=impl)
        return self.o_proj(checkpoint_name(out.reshape(b, t, -1), "attn_context"), o_rng)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) · up with a hand-written backward: both input gradients from one pass over
    (gate, up, dh) instead of autodiff's chain of element-wise passes through silu's sigmoid."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    g = gate.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh32 = dh.astype(jnp.float32)
    d_gate = dh32 * up.astype(jnp.float32) * sig * (1.0 + g * (1.0 - sig))
    return d_gate.astype(gate.dtype), (dh32 * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, *, use_bias: bool = False, stack: tuple = (),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=use_bias)
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd: jax.Array, rngs=(None, None, None)) -> jax.Array:
        gate, up = self.gate_proj(x_btd, rngs[0]), self.up_proj(x_btd, rngs[1])
        gate = checkpoint_name(gate, "mlp_gate")
        up = checkpoint_name(up, "mlp_up")
        h = swiglu(gate, up)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.down_proj(h, rngs[2])
