"""The loss as a sum of terms: the train step adds up whatever terms it is given, with no branch per term.

A `BatchTerm` reads one forward pass over one micro-batch of one stream of the batch (the task batch itself,
or a field of it such as `batch["retain"]`): the model (its head), the final hidden states, the micro-batch
and, when it asks for it, the base model's pass over the same micro-batch. It returns Σ weight·value over
the micro-batch's tokens; the step divides by the stream's total loss weight, so the micro-batches add up to
a token-weighted mean over the global batch. A `StepTerm` does not read the batch (L2 to the base) and is
added once per step. Each term's unweighted value is a metric under its name; `loss` is the task CE.

A new objective is one function returning a term plus one line in `loss_terms`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.train.loss import head_cross_entropy
from ftjax.train.regularizers import chunked_kl_to_base, l2_to_base

TASK = "task"  # the stream that is the batch itself (its top-level arrays)


@dataclasses.dataclass(frozen=True)
class Forward:
    """One forward pass over one micro-batch: what a batch term reads."""

    model: nnx.Module  # the model of this pass (its head: `logits(h)`, `head_weight()` where it has one)
    hidden: jax.Array  # [B, T, D] final hidden states
    batch: dict  # the micro-batch: input_ids, targets, loss_weights, segment_ids, positions
    base: "Forward | None" = None  # the base model's pass over the same micro-batch (constant), if asked for


@dataclasses.dataclass(frozen=True)
class BatchTerm:
    """`fn(forward) -> Σ w·value` over a micro-batch of `stream`; `reads_base`: `forward.base` is filled."""

    name: str
    fn: Callable[[Forward], jax.Array]
    weight: float = 1.0
    stream: str = TASK
    reads_base: bool = False


@dataclasses.dataclass(frozen=True)
class StepTerm:
    """`fn(trainable, base) -> value`, once per step; `needs_base`: it reads the stored step-0 copy `base`."""

    name: str
    fn: Callable[[Any, Any], jax.Array]
    weight: float = 1.0
    needs_base: bool = False


Term = BatchTerm | StepTerm


def cross_entropy(chunk: int) -> BatchTerm:
    """The task loss: token-weighted cross-entropy of the batch's targets, `chunk` positions of logits at a time."""

    def fn(f: Forward) -> jax.Array:
        return head_cross_entropy(f.model, f.hidden, f.batch["targets"], f.batch["loss_weights"], chunk)

    return BatchTerm("loss", fn)


def kl_to_base(weight: float, chunk: int) -> BatchTerm:
    """KL(base ‖ tuned) on the retain stream's reply tokens (forgetting control, ftjax/train/regularizers.py)."""

    def fn(f: Forward) -> jax.Array:
        return chunked_kl_to_base(f.model.logits, f.hidden, f.base.model.logits, f.base.hidden,
                                  f.batch["loss_weights"], chunk)[0]

    return BatchTerm("kl_reg", fn, weight, stream="retain", reads_base=True)


def l2_to_base_term(weight: float) -> StepTerm:
    """Σ‖W − W_base‖² over the trainable weights (full fine-tuning), once per step."""
    return StepTerm("l2_reg", l2_to_base, weight, needs_base=True)


def loss_terms(config) -> list[Term]:
    """The run's objective from its config: the task CE, then forgetting control's terms when weighted."""
    f, chunk = config.forget, config.train.loss_chunk
    terms: list[Term] = [cross_entropy(chunk)]
    terms += [kl_to_base(f.kl_weight, chunk)] if f.kl_weight else []
    terms += [l2_to_base_term(f.l2_weight)] if f.l2_weight else []
    return terms


def uses_base(terms: list) -> bool:
    """Whether any term compares with the base model (full fine-tuning then keeps its step-0 copy)."""
    return any(getattr(t, "reads_base", False) or getattr(t, "needs_base", False) for t in terms)


def weighted_sum(terms: list, values: list[jax.Array]) -> jax.Array:
    """Σ weight · value, in fp32."""
    return sum((t.weight * v for t, v in zip(terms, values)), jnp.zeros((), jnp.float32))
