"""Token-weighted eval loss over an eval set, with the same chunked cross-entropy as training."""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.objectives.loss import chunked_cross_entropy
from ftjax.objectives.regularizers import adapters_zeroed
from ftjax.objectives.terms import BatchTerm, Forward, total_weight


def make_eval_loss(graphdef: nnx.GraphDef, loss_chunk: int = 512):
    """jit((trainable, frozen, batch) -> (sum of weighted CE, sum of weights))."""

    @jax.jit
    def sums(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        h = model.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"])
        return chunked_cross_entropy(model.logits, h, batch["targets"], batch["loss_weights"], loss_chunk)

    return sums


def eval_loss(sums_fn, trainable, frozen, batches: Iterable[dict], weights=1.0) -> float:
    """Mean CE per trained token over all batches (one host fetch at the end); with several terms' sums
    (`make_terms_eval`), Σ weight · each term's mean."""
    total, weight = 0.0, 0.0
    for batch in batches:
        s, w = sums_fn(trainable, frozen, batch)
        total, weight = total + s, weight + w
    return float(jnp.sum(jnp.asarray(weights) * (total / jnp.maximum(weight, 1.0))))


def make_terms_eval(graphdef: nnx.GraphDef, terms: list[BatchTerm], teacher_graphdef: nnx.GraphDef | None = None):
    """jit((trainable, frozen: Frozen, batch) -> ([Σ value], [Σ normalizer]) per term): the eval loss of an
    objective other than the CE alone (a preference loss on held-out pairs, with its NLL term; a distillation
    loss), each term read exactly as the train step reads it; `eval_loss(..., weights=[term weights])` combines
    them. `teacher_graphdef`: a teacher model of its own, its weights `frozen.teacher`."""
    teacher_stream = next((t.teacher_stream for t in terms if t.teacher_stream is not None), None)

    def passes(model, batch):
        return model.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"])

    @jax.jit
    def sums(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen.model)
        ref_model, reference, teacher = None, None, None
        if any(t.reads_reference for t in terms) or (teacher_stream and teacher_graphdef is None):
            # the step-0 copy where kept, else LoRA's zeroed adapters
            ref_trainable = frozen.start_copy if frozen.start_copy is not None else adapters_zeroed(trainable)
            ref_model = nnx.merge(graphdef, ref_trainable, frozen.model)
        if any(t.reads_reference for t in terms):
            reference = Forward(ref_model, passes(ref_model, batch), batch)
        if teacher_stream:
            teacher_model = ref_model if teacher_graphdef is None else nnx.merge(teacher_graphdef, frozen.teacher)
            teacher = Forward(teacher_model, passes(teacher_model, batch[teacher_stream]), batch[teacher_stream])
        forward = Forward(model, passes(model, batch), batch, reference, teacher=teacher)
        outs = [t.fn(forward) for t in terms]
        values = [o[0] if t.metrics else o for t, o in zip(terms, outs)]
        return jnp.stack(values), jnp.stack([(t.normalizer or total_weight)(batch) for t in terms])

    return sums
