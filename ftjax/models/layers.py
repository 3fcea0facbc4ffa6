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


def causal_blocks(t: int, block: int = 128) -> int:
    """Query blocks for causal block skipping: blocks of `block` tokens when they tile the sequence."""
    return t // block if t % block == 0 and t >= 2 * block else 1


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
    """Grouped-query self-attention through jax.nn.dot_product_attention."""

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
        q = self.q_proj(x_btd, rngs[0]).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x_btd, rngs[1]).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x_btd, rngs[2]).reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, sin, cos), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, sin, cos), ("batch", "length", "act_kv", None))
        v = constrain(v, ("batch", "length", "act_kv", None))
        return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")

    def attend(self, q_btnh, k_bskh, v_bskh, mask, o_rng=None, *, causal: bool = False) -> jax.Array:
        """Masked softmax attention and the output projection.

        `causal` (query i and key i are the same slot and the mask is causal, as in training) lets the
        XLA path skip key blocks that lie wholly after a query block: ~1/4 less attention work at 2 blocks.
        """
        b, t = q_btnh.shape[:2]
        impl = None if self.cfg.implementation == "xla" else self.cfg.implementation
        blocks = causal_blocks(t) if causal and impl is None and k_bskh.shape[1] == t else 1
        if blocks == 1:
            out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, implementation=impl)
        else:
            size = t // blocks
            out = jnp.concatenate([
                jax.nn.dot_product_attention(q_btnh[:, i * size:(i + 1) * size], k_bskh[:, :(i + 1) * size],
                                             v_bskh[:, :(i + 1) * size],
                                             mask=mask[:, :, i * size:(i + 1) * size, :(i + 1) * size])
                for i in range(blocks)], axis=1)
        return self.o_proj(checkpoint_name(out.reshape(b, t, -1), "attn_context"), o_rng)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, *, use_bias: bool = False, stack: tuple = (),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=use_bias)
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd: jax.Array, rngs=(None, None, None)) -> jax.Array:
        gate = checkpoint_name(self.gate_proj(x_btd, rngs[0]), "mlp_gate")
        h = jax.nn.silu(gate) * checkpoint_name(self.up_proj(x_btd, rngs[1]), "mlp_up")
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.down_proj(h, rngs[2])
