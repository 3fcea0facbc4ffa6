"""Decoder building blocks: RMSNorm, rotary embeddings, attention with segment ids, gated MLP.

Parameters carry logical axis names (`logical_axes` metadata); `ftjax.sharding` places them.
Every module may be built with a leading `stack` of layers (params [L, ...]) and is then
called on one layer's slice inside `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax.models.adapter import ADAPTER_HIDDEN, Adapter
from ftjax.models.attention import Rows, attention
from ftjax.quant.weight import QuantizedWeight
from ftjax.sharding import constrain


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
    """RMSNorm computed in fp32, as transformers' Llama does, then scaled in the input dtype; with `offset`
    (Gemma) the stored weight w scales by (1 + w), in fp32 before the cast, as transformers' Gemma does."""

    def __init__(self, dim: int, *, eps: float, stack: tuple = (), param_dtype=jnp.float32, offset: bool = False):
        self.eps, self.offset = eps, offset
        self.scale = _param(None, (*stack, dim), ("layers",) * len(stack) + ("norm",), param_dtype,
                            "zeros" if offset else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def dense_kernel(kernel: nnx.Variable, dtype) -> jax.Array:
    """A kernel's value in `dtype`; a quantized one dequantized (inside the layer scan: this layer's only)."""
    value = kernel.get_value()
    return (value.dequantize() if isinstance(value, QuantizedWeight) else value).astype(dtype)


def frozen_product(x2: jax.Array, kernels: tuple, dtype) -> jax.Array:
    """x2 @ [K1 | K2 | ...]. With a quantized kernel among them the product is rematerialized: the backward
    pass dequantizes again instead of keeping every layer's full-precision weights for it."""
    values = tuple(k.get_value() for k in kernels)

    def product(x, vals):
        dense = [(v.dequantize() if isinstance(v, QuantizedWeight) else v).astype(dtype) for v in vals]
        return x @ (dense[0] if len(dense) == 1 else jnp.concatenate(dense, axis=-1))

    if any(isinstance(v, QuantizedWeight) for v in values):
        return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(x2, values)
    return product(x2, values)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ lora(x)); kernel [in, out]. `lora`, the linear's attach point, holds an
    `Adapter` attached from outside (ftjax.lora); its name is the adapter's path in checkpoints and exports."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 stack: tuple = (), dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        lead = ("layers",) * len(stack)
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.kernel = _param(rngs, (*stack, in_features, out_features), lead + tuple(axes), param_dtype)
        self.bias = _param(None, (*stack, out_features), lead + (axes[1],), param_dtype, "zeros") if use_bias else None
        self.lora: Adapter | None = None

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        # Rows flattened to 2-D: the weight gradient is then one plain [in, rows] x [rows, out] GEMM;
        # with [B, T] rows XLA CPU transposes the activations for it (a slow copy every layer).
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = frozen_product(x2, (self.kernel,), self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x2, rng).astype(y.dtype)
        return y.reshape(*lead, y.shape[-1])

    def fold(self) -> None:
        """For inference, in place: the kernel as one dense array in the compute dtype (a quantized one dequantized)
        plus its adapter's low-rank update, x @ (W + A·B·s), and the adapter dropped: equal to the unfolded product
        up to fp32 rounding. Generation folds its per-layer copy once (Llama.layer_slices) rather than dequantizing
        and running the adapter's GEMMs on every token. An adapter that is not low rank stays as it is."""
        w = dense_kernel(self.kernel, jnp.float32)
        factors = None if self.lora is None else self.lora.low_rank(jnp.float32)
        if factors is not None:
            a, b, scale = factors
            w = w + (a @ b) * jnp.asarray(scale, jnp.float32)
            self.lora = None
        self.kernel = nnx.Param(w.astype(self.dtype))


def fused_linears(x: jax.Array, linears: tuple, rngs: tuple) -> list[jax.Array]:
    """Several linears on the same input as one GEMM: x @ [W1 | W2 | ...], split afterwards.

    The stored parameters keep their layout (HF import/export, PEFT, sharding rules and checkpoints
    see separate kernels); only the step concatenates them, a few MB per layer. Their low-rank adapters
    become one GEMM too: x @ [A1 | A2 | ...] (the saved `ADAPTER_HIDDEN`) times a block-diagonal
    [B1·s1, B2·s2, ...] — unless one is not low rank this call (adapter dropout drawn): then each runs alone.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    sizes = [lin.out_features for lin in linears]
    y = frozen_product(x2, tuple(lin.kernel for lin in linears), linears[0].dtype)
    if any(lin.bias is not None for lin in linears):
        y = y + jnp.concatenate([jnp.zeros((lin.out_features,), lin.dtype) if lin.bias is None
                                 else lin.bias[...].astype(lin.dtype) for lin in linears])
    adapters = [(i, lin.lora) for i, lin in enumerate(linears) if lin.lora is not None]
    factors = [ad.low_rank(x2.dtype, rngs[i]) for i, ad in adapters]
    if adapters and all(f is not None for f in factors):
        a = jnp.concatenate([fa for fa, _, _ in factors], axis=-1)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        rows = []
        for (i, _), (_, fb, scale) in zip(adapters, factors):
            b = fb * jnp.asarray(scale, x2.dtype)
            rows.append(jnp.pad(b, ((0, 0), (offsets[i], total - offsets[i] - sizes[i]))))
        y = y + (checkpoint_name(x2 @ a, ADAPTER_HIDDEN) @ jnp.concatenate(rows, axis=0)).astype(y.dtype)
        adapters = []
    outs = jnp.split(y, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)], axis=-1)
    for i, ad in adapters:
        outs[i] = outs[i] + ad(x2, rngs[i]).astype(y.dtype)
    return [o.reshape(*lead, o.shape[-1]) for o in outs]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `kind` is default, linear, llama3 or longrope (transformers' rope types)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple = ()  # longrope (Phi-3.5 / Phi-4-mini): per-frequency divisors up to the original length
    long_factor: tuple = ()  # ... and past it
    attention_factor: float = 1.0  # longrope: sin and cos scaled by it


def rope_inv_freq(head_dim: int, rope: RopeConfig, *, long: bool = False) -> jax.Array:
    """Inverse frequencies, including Llama 3.1 style frequency-dependent scaling (longrope: the short
    factors, or the long ones with `long`)."""
    if rope.kind == "longrope":
        ext = jnp.asarray(rope.long_factor if long else rope.short_factor, jnp.float32)
        return 1.0 / (ext * rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
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


def rope_tables(positions: jax.Array, rotary_dim: int, rope: RopeConfig) -> tuple[jax.Array, jax.Array]:
    """sin/cos of `rope` for `positions`. Longrope takes its long factors when any position of the call reaches
    past the original length (transformers decides per forward call, over the whole batch, the same way)."""
    inv = rope_inv_freq(rotary_dim, rope)
    if rope.kind != "longrope":
        return rope_sin_cos(positions, inv)
    longer = jnp.max(positions) + 1 > rope.original_max_position_embeddings
    sin, cos = rope_sin_cos(positions, jnp.where(longer, rope_inv_freq(rotary_dim, rope, long=True), inv))
    return sin * rope.attention_factor, cos * rope.attention_factor


def apply_rope(x_btnh: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding (the HF layout of q/k rows); sin/cos narrower than the head rotate its
    first dims only (partial rotary, Phi-4-mini)."""
    rot = sin.shape[-1]
    if rot < x_btnh.shape[-1]:
        return jnp.concatenate([apply_rope(x_btnh[..., :rot], sin, cos), x_btnh[..., rot:]], axis=-1)
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    sin, cos = sin[:, :, None, :].astype(x_btnh.dtype), cos[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin


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
    implementation: str = "xla"  # a backend of ftjax.models.attention
    windows: tuple = (None,)  # the distinct sliding windows of the layers (None = full causal)
    softcap: float | None = None  # logit soft-cap
    fuse_qkv: bool = True  # q/k/v as one GEMM (off when the tensor axis splits heads: the concat would gather)
    scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)
    packed: bool = False  # q/k/v stored as one `qkv_proj` (Phi-3), one adapter over its fused output
    qk_norm_offset: bool = False  # q/k norms scale by (1 + w) (Gemma 3)
    max_segments: int = 0  # segments a training row holds at most: 1 = one example a row, 0 = no bound


class Attention(nnx.Module):
    """Grouped-query self-attention: projections here, the softmax part in ftjax.models.attention."""

    def __init__(self, cfg: AttentionConfig, *, stack: tuple = (), dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        kw: dict[str, Any] = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.packed:
            self.qkv_proj = Linear(d, (n + 2 * k) * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        else:
            self.q_proj = Linear(d, n * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
            self.k_proj = Linear(d, k * h, axes=("embed", "kv"), use_bias=cfg.qkv_bias, **kw)
            self.v_proj = Linear(d, k * h, axes=("embed", "kv"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            norm_kw: dict[str, Any] = dict(eps=cfg.rms_norm_eps, stack=stack, param_dtype=param_dtype,
                                           offset=cfg.qk_norm_offset)
            self.q_norm = RMSNorm(h, **norm_kw)
            self.k_norm = RMSNorm(h, **norm_kw)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x_btd, sin, cos, rngs=(None, None, None)):
        """q [B,T,N,H] and k, v [B,T,K,H] with q/k-norm and rotary applied."""
        c = self.cfg
        b, t, _ = x_btd.shape
        # One GEMM [D, (N + 2K)·H] instead of three (SmolLM2's k/v ones, 192 wide, run at about half the
        # rate of wide ones on CPU); not when the tensor axis splits the heads (the concat would gather).
        if c.packed:
            q, k, v = jnp.split(self.qkv_proj(x_btd, rngs[0]),
                                [c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads) * c.head_dim], axis=-1)
        elif c.fuse_qkv:
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

    def attend(self, q_btnh, k_bskh, v_bskh, rows: Rows, window_index=None, o_rng=None) -> jax.Array:
        """Attention over `rows` and the output projection. Layers with different windows pick theirs by
        `window_index` into cfg.windows (lax.switch: each kernel call keeps a static window)."""
        b, t = q_btnh.shape[:2]
        c = self.cfg
        calls = [functools.partial(attention, rows=rows, scale=c.scale, softcap=c.softcap, window=w,
                                   implementation=c.implementation, packed=c.max_segments != 1,
                                   max_segments=c.max_segments) for w in c.windows]
        if len(calls) == 1:
            out = calls[0](q_btnh, k_bskh, v_bskh)
        else:
            out = jax.lax.switch(window_index, calls, q_btnh, k_bskh, v_bskh)
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
    """Gated feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-approximated gelu (Gemma's
    GeGLU); with `packed` gate and up are one stored `gate_up_proj` (Phi-3), gate first."""

    def __init__(self, hidden: int, intermediate: int, *, use_bias: bool = False, stack: tuple = (),
                 dtype=jnp.float32, param_dtype=jnp.float32, activation: str = "silu", packed: bool = False,
                 rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=use_bias)
        self.activation = activation
        if packed:
            self.gate_up_proj = Linear(hidden, 2 * intermediate, axes=("embed", "mlp"), **kw)
        else:
            self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
            self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd: jax.Array, rngs=(None, None, None)) -> jax.Array:
        if hasattr(self, "gate_up_proj"):
            gate, up = jnp.split(self.gate_up_proj(x_btd, rngs[0]), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x_btd, rngs[0]), self.up_proj(x_btd, rngs[1])
        gate = checkpoint_name(gate, "mlp_gate")
        up = checkpoint_name(up, "mlp_up")
        h = swiglu(gate, up) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True) * up
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.down_proj(h, rngs[2])
