"""What every fine-tuning method answers: the run, the memory estimate, the workdir and export ask it."""

from __future__ import annotations

import abc
from typing import Any

from flax import nnx

ATTENTION_FLOPS = ("attention 12*N*H*sum over layers of keys (causal T/2, so 6*L*N*H*T; a sliding window W < T: "
                   "W - W^2/2T), fwd+bwd; P: matmul params a token passes through incl. head (MoE: router + top-k "
                   "experts)")


class Method(abc.ABC):
    """One fine-tuning method. Subclasses set `name` and `trainable` and override what differs."""

    name: str
    trainable: Any  # the nnx filter of what trains (and what a checkpoint holds)
    checkpoint_holds_every_weight: bool  # True: the frozen part is empty, loading needs only the shapes
    keeps_start_copy: bool  # True: the step-0 weights are a copy (full); False: adapters off give them, free
    export_formats: tuple[str, ...] = ("hf", "gguf")
    flop_formula: str  # `flops_per_token` written down (benchmark records carry it)
    adapter_width: int = 0  # per token and layer, the adapter hidden values the backward pass keeps

    def attach(self, model: nnx.Module, seed: int) -> nnx.Module:
        """The model this method trains, from the pre-trained one (in place): adapters attached, or as it is."""
        return model

    def full_weights(self, model: nnx.Module) -> nnx.Module:
        """The trained model as plain weights (what an HF / GGUF export writes and a full run starts from)."""
        return model

    def continues(self, previous: "Method") -> bool:
        """Whether a run of this method on a workdir of `previous` trains on that workdir's own trainable part."""
        return False

    @abc.abstractmethod
    def flops_per_token(self, model_cfg: Any, seq_len: int, trainable: nnx.State) -> float:
        """Training FLOPs per token of `model_cfg` at `seq_len`, this method's `trainable` state (`flop_formula`)."""

    def describe(self) -> dict | None:
        """What a report or benchmark record says of the method beyond its name (LoRA: rank, alpha, targets)."""
        return None
