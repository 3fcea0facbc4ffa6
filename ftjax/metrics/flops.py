"""The FLOP model: training FLOPs per token, the numerator of MFU (honest numbers: the formula written down).

FLOPs per trained token (P = matmul weights a token passes through, incl. the output head; T = sequence length):
  full fine-tuning: 6·P + attention
  LoRA:             4·P_frozen + 6·P_lora + attention   (no weight gradients for frozen weights)
    P_lora: the adapter params a token runs through: every Linear's adapter, and of a mixture of experts'
    per-expert adapters the top-k of E (k/E of them)
  attention (forward + backward): 12 · heads · head_dim · Σ_layers keys, keys per query as the area under
    the mask: causal T/2 (so 6 · layers · heads · head_dim · T), a sliding window W < T: W − W²/2T
  mixture of experts: a layer's MLP weights in P are its router (D·E) and its top-k experts (k · 3·D·F), not all E
"""

from __future__ import annotations

import math

from flax import nnx

from ftjax.models.llama import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """One layer's q, k, v and o projection weights."""
    d, h = cfg.hidden_size, cfg.head_dim
    return d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls per token: attention, MLP (an MoE layer: router + the top-k experts
    a token is routed to) and the output head."""
    d = cfg.hidden_size
    attn = attention_params(cfg)
    moe = cfg.moe
    if moe is None:
        mlp = 3 * d * cfg.intermediate_size
    else:
        mlp = d * moe.num_experts + moe.top_k * 3 * d * moe.intermediate_size
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def attended_keys(seq_len: int, window: int | None) -> float:
    """Keys per query, as the area under the causal mask over T²: T/2, or W − W²/2T for a window W < T."""
    if window is None or window >= seq_len:
        return seq_len / 2
    return window - window * window / (2 * seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """QK^T and AV over each layer's attended keys (sliding-window layers: their window only), fwd + bwd."""
    keys = sum(attended_keys(seq_len, w) for w in cfg.layer_windows())
    return 12.0 * cfg.num_heads * cfg.head_dim * keys


def full_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token when every weight trains: 6·P + attention (see the module docstring)."""
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def adapter_flops_per_token(cfg: ModelConfig, seq_len: int, adapter_params: int) -> float:
    """Training FLOPs per token when only adapters train: 4·P (no weight gradients of the frozen matmuls) +
    6·P_adapter + attention (see the module docstring)."""
    return 4.0 * matmul_params(cfg) + 6.0 * adapter_params + attention_flops_per_token(cfg, seq_len)


def active_lora_params(cfg: ModelConfig, lora: nnx.State) -> int:
    """Adapter params a token runs through (P_lora): all of each Linear's adapter; of the experts' per-expert
    adapters (params with an `expert` axis, [L, E, ...]) only the top-k of E experts the token is routed to."""
    total = 0
    for _, var in nnx.to_flat_state(lora):
        n = math.prod(var.get_value().shape)
        if "expert" in (var.get_metadata().get("logical_axes") or ()):
            n = n // cfg.moe.num_experts * cfg.moe.top_k
        total += n
    return total
