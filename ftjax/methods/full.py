"""Full fine-tuning: every parameter trains; the checkpoint holds every weight."""

from __future__ import annotations

from typing import Any

from flax import nnx

from ftjax.metrics.flops import full_flops_per_token
from ftjax.methods.method import ATTENTION_FLOPS, Method


class Full(Method):
    name = "full"
    trainable = nnx.Param
    checkpoint_holds_every_weight = True
    flop_formula = "6*P + attention; " + ATTENTION_FLOPS
    keeps_start_copy = True  # the step-0 weights (KL / L2 / reference / report's base) are a copy

    def __init__(self, lora=None):
        """`lora` (the run's lora.* spec) does not apply to full fine-tuning."""

    def flops_per_token(self, model_cfg: Any, seq_len: int, trainable: nnx.State) -> float:
        return full_flops_per_token(model_cfg, seq_len)
