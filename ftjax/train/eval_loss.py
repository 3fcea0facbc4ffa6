"""Token-weighted eval loss over an eval set, with the same chunked cross-entropy as training."""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.train.loss import chunked_cross_entropy


def make_eval_loss(graphdef: nnx.GraphDef, loss_chunk: int = 512):
    """jit((trainable, frozen, batch) -> (sum of weighted CE, sum of weights))."""

    @jax.jit
    def sums(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        h = model.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"])
        return chunked_cross_entropy(model.logits, h, batch["targets"], batch["loss_weights"], loss_chunk)

    return sums


def eval_loss(sums_fn, trainable, frozen, batches: Iterable[dict]) -> float:
    """Mean CE per trained token over all batches (one host fetch at the end)."""
    total, weight = jnp.zeros(()), jnp.zeros(())
    for batch in batches:
        s, w = sums_fn(trainable, frozen, batch)
        total, weight = total + s, weight + w
    return float(total / jnp.maximum(weight, 1.0))
