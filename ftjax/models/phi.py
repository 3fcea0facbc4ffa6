"""Phi-3/4's block of the model config: fused projections and partial rotary, read only here.

Phi stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (so one adapter spans each fused output),
and Phi-4-mini rotates only the first dims of each head. The decoder asks the functions below (each takes the
block, None for a model without one); the HF config mapping of the block lives here too, both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The per-projection names each fused one stands for (LoRA's default targets mean the fused ones here).
FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
               "up_proj": "gate_up_proj"}


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    """The Phi block of `ModelConfig` (hashable: static under jit): projections stored fused."""

    rotary_dim: int | None = None  # rotary on the first dims of each head only (Phi-4-mini); None = head_dim


def packed_projections(p: PhiConfig | None) -> bool:
    """Whether qkv_proj and gate_up_proj are stored fused."""
    return p is not None


def rotated_dims(p: PhiConfig | None, head_dim: int) -> int:
    """The dims of each head that rotary embeddings rotate."""
    return (None if p is None else p.rotary_dim) or head_dim


def phi_from_hf(hf: dict, head_dim: int) -> dict[str, Any]:
    """The ModelConfig fields of a Phi-3/4 config.json (partial_rotary_factor: classic or in rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    factor = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return {"phi": PhiConfig(rotary_dim=int(head_dim * factor) if factor != 1.0 else None)}


def phi_to_hf(cfg) -> dict[str, Any]:
    """The config.json keys of a Phi-3/4 `ModelConfig` that `phi_from_hf` and the registry read back."""
    d: dict[str, Any] = {"sliding_window": cfg.sliding_window}
    if cfg.phi.rotary_dim is not None:
        d["partial_rotary_factor"] = cfg.phi.rotary_dim / cfg.head_dim
    return d
