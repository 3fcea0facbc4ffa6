"""The loss as a sum of terms: the train step adds up whatever terms it is given, with no branch per term.

A `BatchTerm` reads one forward pass over one micro-batch of one stream of the batch (the task batch itself,
or a field of it such as `batch["retain"]`): the model (its head), the final hidden states, the micro-batch
and, when it asks for it, the reference pass over the same micro-batch (the model before training). It returns Σ weight·value over
the micro-batch's tokens (or pairs); the step divides by the term's normalizer of the global stream batch (its
total loss weight, or its pair count for a preference loss), so the micro-batches add up to a mean over the
global batch. A `StepTerm` does not read the batch (L2 to the base) and is
added once per step. Each term's unweighted value is a metric under its name; `loss` is the objective's
own term (the task CE, or the preference loss of `objective`).

An objective (ftjax/objectives/) gives its own terms; forgetting control and a mixture-of-experts model's router
balance loss (it reads the router logits of the same forward pass, `Forward.router_logits`) are terms too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models.moe import balance_loss_weight, load_balancing_loss
from ftjax.objectives.loss import head_cross_entropy
from ftjax.objectives.regularizers import chunked_kl_to_base, l2_to_base

TASK = "task"  # the stream that is the batch itself (its top-level arrays)


@dataclasses.dataclass(frozen=True)
class Forward:
    """One forward pass over one micro-batch: what a batch term reads."""

    model: nnx.Module  # the model of this pass (its head: `logits(h)`, `head_weight()` where it has one)
    hidden: jax.Array  # [B, T, D] final hidden states
    batch: dict  # the micro-batch: input_ids, targets, loss_weights, segment_ids, positions
    reference: "Forward | None" = None  # the reference pass over the same micro-batch (constant), if asked for
    router_logits: jax.Array | None = None  # [L, B, T, E] of a mixture-of-experts model's pass; None if dense
    teacher: "Forward | None" = None  # the teacher's pass over the term's teacher stream (constant), if asked for


@dataclasses.dataclass(frozen=True)
class BatchTerm:
    """`fn(forward) -> Σ w·value` over a micro-batch of `stream`; `reads_reference`: `forward.reference` is filled.

    The step divides the sum by `normalizer(global stream batch)` (default: its total loss weight). With
    `metrics`, `fn` returns `(Σ, {metric: Σ})` and each metric, divided the same way, is logged too. With
    `teacher_stream`, `forward.teacher` is the teacher's pass over that stream of the batch (the same rows as the
    term's, as the teacher sees them): a model of its own (`Frozen.teacher`), else the model before training."""

    name: str
    fn: Callable[[Forward], Any]
    weight: float = 1.0
    stream: str = TASK
    reads_reference: bool = False
    normalizer: Callable[[dict], jax.Array] | None = None
    metrics: tuple[str, ...] = ()
    teacher_stream: str | None = None
    # what `metrics` are divided by instead of `normalizer` (a token mean beside a per-completion loss)
    metric_normalizer: Callable[[dict], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class StepTerm:
    """`fn(trainable, start_copy) -> value`, once per step; `needs_start_copy`: it reads the stored step-0 copy."""

    name: str
    fn: Callable[[Any, Any], jax.Array]
    weight: float = 1.0
    needs_start_copy: bool = False


Term = BatchTerm | StepTerm


def cross_entropy_of(weights: Callable[[dict], jax.Array], chunk: int) -> Callable[[Forward], jax.Array]:
    """Σ weight · CE of the micro-batch's targets, `weights(batch)` per position, `chunk` positions at a time."""

    def fn(f: Forward) -> jax.Array:
        return head_cross_entropy(f.model, f.hidden, f.batch["targets"], weights(f.batch), chunk)

    return fn


def cross_entropy(chunk: int) -> BatchTerm:
    """The task loss: token-weighted cross-entropy of the batch's targets, `chunk` positions of logits at a time."""
    return BatchTerm("loss", cross_entropy_of(lambda batch: batch["loss_weights"], chunk))


def kl_to_base(weight: float, chunk: int) -> BatchTerm:
    """KL(base ‖ tuned) on the retain stream's reply tokens (forgetting control, ftjax/objectives/regularizers.py)."""

    def fn(f: Forward) -> jax.Array:
        return chunked_kl_to_base(f.model.logits, f.hidden, f.reference.model.logits, f.reference.hidden,
                                  f.batch["loss_weights"], chunk)[0]

    return BatchTerm("kl_reg", fn, weight, stream="retain", reads_reference=True)


def l2_to_base_term(weight: float) -> StepTerm:
    """Σ‖W − W_base‖² over the trainable weights (full fine-tuning), once per step."""
    return StepTerm("l2_reg", l2_to_base, weight, needs_start_copy=True)


ROUTER_BALANCE = "router_balance"


def router_balance(weight: float, top_k: int, grad_accum: int) -> BatchTerm:
    """A mixture-of-experts model's load-balancing loss: transformers' `load_balancing_loss_func` over every
    layer's router logits of the micro-batch's tokens (padding, segment 0, left out, as its attention mask does).
    It is not a sum over tokens, so the normalizer is the micro-batch count: with grad_accum=1 it equals
    transformers' loss on the global batch; with grad_accum > 1 it is the mean of the micro-batches' losses (what
    HF Trainer's gradient accumulation adds up)."""

    def fn(f: Forward) -> jax.Array:
        return load_balancing_loss(f.router_logits, top_k, f.batch["segment_ids"] > 0)

    return BatchTerm(ROUTER_BALANCE, fn, weight, normalizer=lambda batch: jnp.asarray(grad_accum, jnp.float32))


def router_aux_weight(weight: float | None, model_cfg) -> float:
    """`weight` (moe.router_aux_weight), or (unset) the model's own `router_aux_loss_coef`; 0 for a dense model."""
    moe = getattr(model_cfg, "moe", None)
    if moe is None:
        return 0.0
    return balance_loss_weight(moe, weight)


def total_weight(batch: dict, weights: jax.Array | None = None) -> jax.Array:
    """Σ loss weights of a global batch (a batch term's default normalizer), or Σ `weights` given for it; an
    all-padding batch gives 1 (zero loss and gradients, not 0/0)."""
    weights = batch["loss_weights"] if weights is None else weights
    weight_sum = jnp.sum(weights.astype(jnp.float32))
    return jnp.where(weight_sum == 0, 1.0, weight_sum)


def uses_reference(terms: list, own_teacher: bool = False) -> bool:
    """Whether any term compares with the model before training (full fine-tuning then keeps its step-0 copy): a
    teacher pass is the model before training unless the run has a teacher of its own (`own_teacher`)."""
    return any(getattr(t, "reads_reference", False) or getattr(t, "needs_start_copy", False)
               or (getattr(t, "teacher_stream", None) is not None and not own_teacher) for t in terms)


def weighted_sum(terms: list, values: list[jax.Array]) -> jax.Array:
    """Σ weight · value, in fp32."""
    return sum((t.weight * v for t, v in zip(terms, values)), jnp.zeros((), jnp.float32))
