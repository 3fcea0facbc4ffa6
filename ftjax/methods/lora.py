"""LoRA: adapters on the target linears train, the pre-trained weights stay frozen (quantized: QLoRA)."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from ftjax.lora import apply_lora, merged
from ftjax.metrics.flops import active_lora_params, adapter_flops_per_token
from ftjax.methods.method import ATTENTION_FLOPS, Method


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """`lora.*`: the adapters' shape and where they attach."""

    rank: int
    alpha: float
    targets: str | tuple[str, ...]
    dropout: float = 0.0
    rslora: bool = False

    @property
    def target_list(self) -> list[str]:
        t = self.targets
        return [x for x in t.split(",") if x] if isinstance(t, str) else list(t)


class Lora(Method):
    name = "lora"
    trainable = nnx.LoRAParam
    checkpoint_holds_every_weight = False  # the adapters only; the frozen base is read from model.path
    keeps_start_copy = False  # the step-0 model is this one with its adapters zeroed or detached
    export_formats = ("hf", "gguf", "peft")
    flop_formula = ("4*P_frozen + 6*P_lora + attention (no weight gradients for frozen weights; P_lora: adapter params "
                    "a token runs through, MoE: the top-k experts' adapters); " + ATTENTION_FLOPS)

    def __init__(self, spec: LoraSpec):
        self.spec = spec

    def attach(self, model: nnx.Module, seed: int) -> nnx.Module:
        s = self.spec
        return apply_lora(model, s.rank, s.alpha, targets=s.targets, dropout=s.dropout, rslora=s.rslora,
                          rngs=nnx.Rngs(seed))

    def full_weights(self, model: nnx.Module) -> nnx.Module:
        return merged(model)

    def continues(self, previous: Method) -> bool:
        return isinstance(previous, Lora)

    @property
    def adapter_width(self) -> int:
        return self.spec.rank * len(self.spec.target_list)

    def flops_per_token(self, model_cfg: Any, seq_len: int, trainable: nnx.State) -> float:
        return adapter_flops_per_token(model_cfg, seq_len, active_lora_params(model_cfg, trainable))

    def describe(self) -> dict:
        return {"rank": self.spec.rank, "alpha": self.spec.alpha, "targets": self.spec.targets}
