"""The train step: `(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)`.

One code path for LoRA and full fine-tuning (only the filter that made `trainable` differs),
compiled once with explicit in/out shardings, trainable and optimizer state donated. Gradients
are accumulated over micro-batches by `lax.scan`; the loss is the token-weighted mean over the
whole global batch. Metrics stay on device; the loop fetches them every `log_every` steps.
Dropout masks do not depend on the mesh, but do on grad_accum (each micro-batch gets its own key).

The loss is the weighted sum of the step's terms (ftjax/objectives/terms.py): each micro-batch runs one forward
pass per batch stream the terms read (the task batch, `batch["retain"]` for KL to the pre-trained model), the
reference pass where a term asks for it, then every batch term on those outputs; step terms (L2 to the step-0
weights) are added once per step. `frozen` is the model's frozen part, or `Frozen(model, start_copy)` with the
step-0 copy of the trainable weights (full fine-tuning); without it the reference is LoRA's model with its
adapters zeroed (no copy). A term with a teacher stream (distillation) also reads the teacher's pass over that stream:
`Frozen.teacher`'s weights (a model of its own, the step built with `teacher`), or else the reference model.
`metrics["loss"]` is the objective's own term (the task cross-entropy, or the preference loss); every other
term's unweighted value, a term's own metrics (TRL's rewards/* and logps/*) and `loss_total` join it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.data.packing import BATCH_KEYS, PAIR_KEYS, ROLLOUT_KEYS
from ftjax.errors import ConfigError
from ftjax.lora import adapters_only
from ftjax.objectives.regularizers import adapters_zeroed
from ftjax.objectives.terms import (TASK, BatchTerm, Forward, StepTerm, Term, cross_entropy, total_weight,
                                weighted_sum)
from ftjax.sharding import activation_sharding, batch_sharding, batch_shards
from ftjax.train.optimizer import Optimizer
from ftjax.train.state import StateShardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Frozen:
    """What the step reads and never trains: the model's frozen part, and the step-0 trainable copy if kept."""

    model: Any
    start_copy: Any = None  # the step-0 copy of the trainable weights (with_start_copy), else None
    teacher: Any = None  # the weights of a teacher model of its own (the step built with `teacher`), else None


def micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] -> [A, B/A, ...]; micro-batch i holds rows i, A+i, 2A+i, ... so each device's rows
    are spread evenly over the micro-batches and no row moves between devices."""

    def one(x):
        rows = x.shape[0] // grad_accum
        return x.reshape(rows, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    return {k: one(v) for k, v in batch.items()}


def check_batch(batch: dict, grad_accum: int, shards: int) -> None:
    """Shapes that cannot be split are a config error, reported before compiling."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ConfigError(f"batch is missing {', '.join(missing)}")
    rows = batch["input_ids"].shape[0]
    if rows % (grad_accum * shards):
        raise ConfigError(f"global batch of {rows} rows does not split into train.grad_accum={grad_accum} "
                          f"micro-batches over {shards} batch shards (mesh.data x mesh.fsdp x mesh.expert)")


class TrainStep:
    """The jitted step plus `traces`, a count of how often Python traced it (compile-once check).

    `batch` holds global [B, T] arrays laid out as `self.batch_sharding` (host numpy works on one
    process; on several, build them with `jax.make_array_from_process_local_data`), and a sub-dict of
    the same arrays for each other stream a term reads (`batch["retain"]`).
    """

    def __init__(self, graphdef: nnx.GraphDef, optimizer: Optimizer, mesh: Mesh, shardings: StateShardings,
                 terms: Sequence[Term], *, grad_accum: int = 1, rules: dict | None = None, with_start_copy: bool = False,
                 teacher: Any = None):
        """`teacher`: a teacher model of its own (`.graphdef`, `.shardings` of the weights passed as
        `Frozen.teacher`) that terms with a teacher stream read; None: they read the model before training."""
        if grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {grad_accum}")
        self.batch_terms = [t for t in terms if isinstance(t, BatchTerm)]
        self.step_terms = [t for t in terms if isinstance(t, StepTerm)]
        self.terms = self.batch_terms + self.step_terms  # the order of the sum and of `values`
        names = [t.name for t in self.terms]
        self.metric_names = names + [k for t in self.batch_terms for k in t.metrics]  # a term's own metrics too
        if len(self.terms) != len(terms) or len(set(names)) != len(names) or any(t.weight < 0 for t in terms):
            raise ConfigError(f"loss terms must be BatchTerm/StepTerm with distinct names and weights >= 0, got "
                              + ", ".join(f"{getattr(t, 'name', t)}={getattr(t, 'weight', '?')}" for t in terms))
        for t in self.step_terms:
            if t.needs_start_copy and not with_start_copy:
                raise ConfigError(f"loss term {t.name} needs the step-0 copy of the weights (with_start_copy=True)")
        self.graphdef, self.optimizer, self.mesh, self.rules = graphdef, optimizer, mesh, rules
        self.grad_accum, self.with_start_copy, self.teacher = grad_accum, with_start_copy, teacher
        self._model_streams = tuple(dict.fromkeys([TASK] + [t.stream for t in self.batch_terms]))
        self._teacher_of = {t.stream: t.teacher_stream for t in self.batch_terms if t.teacher_stream is not None}
        self.streams = tuple(dict.fromkeys(self._model_streams + tuple(self._teacher_of.values())))
        self._reference_streams = {t.stream for t in self.batch_terms if t.reads_reference}
        self._needs_reference = bool(self._reference_streams) or (bool(self._teacher_of) and teacher is None)
        self.trainable_sharding = shardings.trainable
        self.traces = 0
        self._compiled = None
        replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = batch_sharding(mesh, rules)
        self._micro_sharding = NamedSharding(mesh, PartitionSpec(None, *self.batch_sharding.spec))
        frozen_sharding = Frozen(shardings.frozen, shardings.trainable if with_start_copy else None,
                                 teacher.shardings if teacher is not None else None)
        self._jitted = jax.jit(
            self._step,
            in_shardings=(shardings.trainable, shardings.opt_state, frozen_sharding, self.batch_sharding,
                          replicated),
            out_shardings=(shardings.trainable, shardings.opt_state, replicated),
            donate_argnums=(0, 1))

    def __call__(self, trainable, opt_state, frozen, batch: dict, rng: jax.Array):
        """`frozen`: the model's frozen state, or `Frozen(model=..., start_copy=...)` when built `with_start_copy`."""
        fn = self._jitted if self._compiled is None else self._compiled
        return fn(trainable, opt_state, *self.arguments(trainable, frozen, batch), rng)

    def compile(self, trainable, opt_state, frozen, batch: dict, rng: jax.Array) -> float:
        """Compile ahead of the first step (later calls run the executable): the loop reports this time as
        `compile_s` and keeps it out of the step times. Returns the seconds it took."""
        start = time.perf_counter()
        self._compiled = self.lower(trainable, opt_state, frozen, batch, rng).compile()
        return time.perf_counter() - start

    def lower(self, trainable, opt_state, frozen, batch: dict, rng: jax.Array):
        """The step lowered for these arguments; its compiled form takes `arguments(...)`'s (frozen, streams)
        in the middle (benchmarks compile it apart from running it)."""
        return self._jitted.lower(trainable, opt_state, *self.arguments(trainable, frozen, batch), rng)

    def arguments(self, trainable, frozen, batch: dict) -> tuple[Frozen, dict]:
        """(Frozen, the batch's streams): the jitted step's middle arguments, checked before compiling."""
        frozen = frozen if isinstance(frozen, Frozen) else Frozen(frozen)
        if (frozen.start_copy is not None) != self.with_start_copy:
            raise ConfigError("this step was built " + ("with" if self.with_start_copy else "without") +
                              " a step-0 copy of the weights; pass frozen=Frozen(model, start_copy) accordingly")
        if (frozen.teacher is not None) != (self.teacher is not None):
            raise ConfigError("this step was built " + ("with" if self.teacher is not None else "without") +
                              " a teacher model of its own; pass frozen=Frozen(model, start_copy, teacher) accordingly")
        if self._needs_reference and not self.with_start_copy and self.traces == 0 and not adapters_only(trainable):
            raise ConfigError("loss terms reading the reference without a step-0 copy need LoRA trainables "
                              "(zeroed adapters = the pre-trained model); for full fine-tuning build the step "
                              "with_start_copy and pass Frozen(frozen, start_copy) with the step-0 weights")
        shards = batch_shards(self.mesh, self.rules)
        streams = {}
        for stream in self.streams:
            part = batch if stream == TASK else batch.get(stream)
            if part is None:
                readers = ", ".join(t.name for t in self.batch_terms if t.stream == stream)
                raise ConfigError(f"loss term {readers} reads batch[{stream!r}], which this batch lacks")
            check_batch(part, self.grad_accum, shards)
            streams[stream] = {k: part[k] for k in BATCH_KEYS + PAIR_KEYS + ROLLOUT_KEYS if k in part}
        return frozen, streams

    def _loss(self, trainable, frozen: Frozen, micro: dict, rng, totals: dict):
        """This micro-batch's share of the weighted batch terms; aux: each term's unweighted share."""
        model = nnx.merge(self.graphdef, trainable, frozen.model)
        reference = None
        if self._needs_reference:
            reference_trainable = frozen.start_copy if self.with_start_copy else adapters_zeroed(trainable)
            reference = nnx.merge(self.graphdef, jax.lax.stop_gradient(reference_trainable), frozen.model)
        teacher = reference
        if self.teacher is not None:
            teacher = nnx.merge(self.teacher.graphdef, jax.lax.stop_gradient(frozen.teacher))
        forwards = {}
        for i, stream in enumerate(self._model_streams):
            mb = micro[stream]
            args = (mb["input_ids"], mb["positions"], mb["segment_ids"])
            stream_rng = rng if i == 0 else jax.random.fold_in(rng, i)
            h, router_logits = model.hidden_and_router_logits(*args, rng=stream_rng)  # logits: None if dense
            # the reference pass has no dropout: the reference distribution is deterministic
            ref_pass = (Forward(reference, reference.hidden(*args), mb) if stream in self._reference_streams
                        else None)
            teacher_pass = None
            if stream in self._teacher_of:  # the teacher's rows of the same examples; no dropout either
                tb = micro[self._teacher_of[stream]]
                teacher_pass = Forward(teacher, teacher.hidden(tb["input_ids"], tb["positions"], tb["segment_ids"]),
                                       tb)
            forwards[stream] = Forward(model, h, mb, ref_pass, router_logits, teacher_pass)
        values, extras = [], {}
        for t in self.batch_terms:
            out = t.fn(forwards[t.stream])
            value, aux = out if t.metrics else (out, {})
            values.append(value / totals[t.name])
            extras.update({k: aux[k] / totals.get(t.name + "/metrics", totals[t.name]) for k in t.metrics})
        return weighted_sum(self.batch_terms, values), (tuple(values), extras)

    def _step(self, trainable, opt_state, frozen: Frozen, streams: dict, rng):
        self.traces += 1
        with activation_sharding(self.mesh, self.rules):
            totals = {t.name: (t.normalizer or total_weight)(streams[t.stream]) for t in self.batch_terms}
            totals.update({t.name + "/metrics": t.metric_normalizer(streams[t.stream]) for t in self.batch_terms
                           if t.metric_normalizer is not None})
            micro = jax.lax.with_sharding_constraint(
                {s: micro_batches(b, self.grad_accum) for s, b in streams.items()}, self._micro_sharding)
            rngs = jax.random.split(rng, self.grad_accum)
            grad_fn = jax.value_and_grad(self._loss, has_aux=True)

            def accumulate(acc, xs):
                mb, r = xs
                (_, values), grads = grad_fn(trainable, frozen, mb, r, totals)
                acc_values, acc_grads = acc
                acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
                acc_grads = jax.lax.with_sharding_constraint(acc_grads, self.trainable_sharding)
                return (jax.tree.map(jnp.add, acc_values, values), acc_grads), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            scalars = (tuple(jnp.zeros((), jnp.float32) for _ in self.batch_terms),
                       {k: jnp.zeros((), jnp.float32) for t in self.batch_terms for k in t.metrics})
            ((values, extras), grads), _ = jax.lax.scan(accumulate, (scalars, zeros), (micro, rngs))
            values = list(values)
            for term in self.step_terms:  # batch-independent: once per step, not per micro-batch
                value, term_grads = jax.value_and_grad(term.fn)(trainable, frozen.start_copy)
                grads = jax.tree.map(lambda g, d, w=term.weight: g + w * d.astype(g.dtype), grads, term_grads)
                values.append(value)
            lr = self.optimizer.schedule(opt_state.applied)  # the lr this update uses
            updates, opt_state = self.optimizer.tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            metrics = {
                **{t.name: v for t, v in zip(self.terms, values)},
                **extras,
                "grad_norm": optax.tree.norm(grads),
                "lr": jnp.asarray(lr, jnp.float32),
                "tokens": jnp.sum(streams[TASK]["loss_weights"] > 0).astype(jnp.int32),
                "skipped": opt_state.skipped,
                "consecutive_skips": opt_state.consecutive,
                "longest_skip_run": opt_state.longest,
            }
            if len(self.terms) > 1:
                metrics["loss_total"] = weighted_sum(self.terms, values)
        return trainable, opt_state, metrics


def make_train_step(state, optimizer: Optimizer, mesh: Mesh, *, terms: Sequence[Term] | None = None,
                    grad_accum: int = 1, loss_chunk: int = 512, rules: dict | None = None,
                    with_start_copy: bool = False, teacher: Any = None) -> TrainStep:
    """The step for a `TrainState` (its graphdef and shardings fix what the step compiles for); `terms`
    defaults to the task cross-entropy alone, `loss_chunk` positions of logits at a time."""
    terms = [cross_entropy(loss_chunk)] if terms is None else terms
    return TrainStep(state.graphdef, optimizer, mesh, state.shardings, terms, grad_accum=grad_accum, rules=rules,
                     with_start_copy=with_start_copy, teacher=teacher)
