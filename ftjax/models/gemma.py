"""Gemma 2/3's block of the model config: what a Gemma decoder does differently from Llama, read only here.

GeGLU MLP, RMSNorms scaling by (1 + w), norms after attention and MLP too ("sandwich"), embeddings scaled by
sqrt(hidden), attention- and output-logit soft-caps, its own softmax scale (query_pre_attn_scalar) and Gemma 3's
rope of its sliding-window layers. The decoder asks the functions below (each takes the block, None for a model
without one), and the HF config mapping of the block lives here too, both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ftjax.errors import LoadError
from ftjax.models.layers import RopeConfig

GEMMA = ("gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The Gemma block of `ModelConfig` (hashable: static under jit); defaults are Gemma's."""

    hidden_act: str = "gelu_tanh"  # the MLP's gate activation: gelu_tanh (GeGLU) | silu (SwiGLU)
    norm_offset: bool = True  # RMSNorms scale by (1 + w)
    sandwich_norms: bool = True  # norms after attention and MLP too, before the residual add
    embed_scale: bool = True  # embeddings times sqrt(hidden_size)
    attn_softcap: float | None = None  # attention-logit soft-cap (Gemma 2)
    final_softcap: float | None = None  # output-logit soft-cap (Gemma 2)
    query_scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim)
    local_rope: RopeConfig | None = None  # the sliding-window layers' own rope (Gemma 3); None = the global one


def activation(g: GemmaConfig | None) -> str:
    """The MLP's gate activation: silu (SwiGLU) without the block."""
    return "silu" if g is None else g.hidden_act


def offset_norms(g: GemmaConfig | None) -> bool:
    """Whether RMSNorms (the q/k norms too) scale by (1 + w)."""
    return g is not None and g.norm_offset


def has_sandwich_norms(g: GemmaConfig | None) -> bool:
    """Whether the decoder layer normalizes attention and MLP outputs before the residual add."""
    return g is not None and g.sandwich_norms


def attention_logits(g: GemmaConfig | None) -> tuple[float | None, float | None]:
    """(attention-logit soft-cap, softmax scale), None each for none / 1/sqrt(head_dim)."""
    return (None, None) if g is None else (g.attn_softcap, g.query_scale)


def sliding_rope(g: GemmaConfig | None) -> RopeConfig | None:
    """The sliding-window layers' own rope, None when they share the global one."""
    return None if g is None else g.local_rope


def scale_embeddings(g: GemmaConfig | None, x: jax.Array, hidden_size: int) -> jax.Array:
    """Embeddings times sqrt(hidden), the factor rounded to the table's dtype first, as transformers' Gemma."""
    if g is None or not g.embed_scale:
        return x
    return x * jnp.asarray(hidden_size ** 0.5, jnp.float32).astype(x.dtype)


def output_softcap(g: GemmaConfig | None) -> float | None:
    """The output-logit soft-cap (then the logits are no plain linear of the hidden states), or None."""
    return None if g is None else g.final_softcap


def cap_logits(g: GemmaConfig | None, logits: jax.Array) -> jax.Array:
    """cap · tanh(logits / cap) with an output soft-cap; the logits unchanged without."""
    cap = output_softcap(g)
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def gemma_from_hf(hf: dict, model_type: str, head_dim: int, source: str, rope_of) -> dict[str, Any]:
    """The ModelConfig fields of a Gemma 2/3 config.json: the block, and Gemma 3's q/k norm and global rope;
    `rope_of(hf, layer_type)` reads a rope as the registry does."""
    if hf.get("use_bidirectional_attention"):
        raise LoadError(f"{source}: bidirectional Gemma 3 attention (an embedding model) is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise LoadError(f"{source}: Gemma activation '{act}' is not supported (gelu_pytorch_tanh)")
    cap = lambda key: None if hf.get(key) is None else float(hf[key])  # noqa: E731
    block = dict(attn_softcap=cap("attn_logit_softcapping"), final_softcap=cap("final_logit_softcapping"),
                 query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5)
    out: dict[str, Any] = {}
    if model_type == "gemma3_text":
        out["qk_norm"] = True
        if isinstance((hf.get("rope_parameters") or {}).get("full_attention"), dict):
            out["rope"], block["local_rope"] = rope_of(hf, "full_attention"), rope_of(hf, "sliding_attention")
        else:  # classic form: rope_theta (+ rope_scaling) global, rope_local_base_freq local
            out["rope"] = rope_of({"rope_theta": 1_000_000.0, **hf}, None)
            block["local_rope"] = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10_000.0)))
    return {**out, "gemma": GemmaConfig(**block)}


def _int_if_whole(x: float) -> float | int:
    """transformers' strict configs type some fields int (query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else x


def gemma_to_hf(cfg) -> dict[str, Any]:
    """The config.json keys of a Gemma 2/3 `ModelConfig` that `gemma_from_hf` reads back."""
    g: GemmaConfig = cfg.gemma
    flags = cfg.sliding_layers or (True,) * cfg.num_layers
    d = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": cfg.sliding_window,
         "layer_types": ["sliding_attention" if f and cfg.sliding_window else "full_attention" for f in flags],
         "attn_logit_softcapping": g.attn_softcap, "final_logit_softcapping": g.final_softcap,
         "query_pre_attn_scalar": _int_if_whole(round((g.query_scale or cfg.head_dim ** -0.5) ** -2, 6))}
    if cfg.model_type == "gemma3_text":
        local = g.local_rope or cfg.rope
        d["rope_local_base_freq"] = local.theta
        if cfg.rope.kind == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope.factor}
    return d
