"""The base model of a LoRA model without a second copy of its weights: the same arrays, adapters detached."""

from __future__ import annotations

import contextlib
from typing import Iterator

from flax import nnx

from ftjax.lora import linears


@contextlib.contextmanager
def adapters_off(model: nnx.Module) -> Iterator[nnx.Module]:
    """Detach every LoRA adapter for the duration of the block (in place), then re-attach them."""
    detached = []
    for _, linear in linears(model):
        if linear.lora is not None:
            detached.append((linear, linear.lora))
            linear.lora = None
    try:
        yield model
    finally:
        for linear, lora in detached:
            linear.lora = lora


def has_adapters(model: nnx.Module) -> bool:
    return any(linear.lora is not None for _, linear in linears(model))


def base_view(model: nnx.Module) -> nnx.Module:
    """A separate module object holding the LoRA model's base weights (shared arrays, no adapters).

    The tuned model keeps its adapters; the view stays valid while those arrays live (the train step
    donates only the trainable adapters, never the frozen base).
    """
    if not has_adapters(model):
        raise ValueError("base_view needs a LoRA model; for full fine-tuning pass the base model itself")
    with adapters_off(model):
        graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)
