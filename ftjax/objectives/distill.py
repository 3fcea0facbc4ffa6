"""Distillation (objective=distill): the student learns the teacher's next-token distribution on the train prompts'
replies, by forward KL, reverse KL or GKD's generalized JSD (distill.loss, distill.beta, distill.temperature), on the
data's replies and, for a fraction distill.lambda_ of the batches, on its own sampled replies (on-policy, GKD).

The teacher is any model ftjax loads (distill.teacher = a path), run in the same step on its own weights, or the
student's own base model (distill.teacher = self): context distillation, the teacher seeing a prefix before each
prompt (distill.teacher_prefix: the report's k-shot examples, retrieved examples or a system prompt) that the
student never sees, so the prompt's behaviour moves into the weights. Under LoRA that teacher is the model with its
adapters off (no second copy of any weight); under full fine-tuning the step-0 copy.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from ftjax.api import load_model, model_config
from ftjax.data.loader import eval_iterator, train_iterator
from ftjax.evaluation.base import base_view, has_adapters
from ftjax.data.packing import group_rows
from ftjax.objectives.distill_data import TEACHER, DistillRows, build_distill_datasets
from ftjax.objectives.distill_prefix import TeacherPrefix
from ftjax.objectives.distill_source import OnPolicyBatches
from ftjax.objectives.distill_term import distill_forward_sums, distill_term
from ftjax.objectives.held_out import eval_loss, make_terms_eval
from ftjax.objectives.objective import MemoryShapes, Objective, Reference, ReportRows, TermSpec
from ftjax.objectives.sources import BatchSource
from ftjax.objectives.teacher import SELF, Teacher, check_teacher_fits, check_teacher_path, load_teacher, teacher_bytes
from ftjax.objectives.terms import Forward, Term


class Distill(Objective):
    """objective=distill with the run's `distill.*`."""

    name = "distill"
    replay_mixes_in = False  # its rows are (student, teacher) pairs of the same example
    compiles_from_shapes = False  # its batches carry the teacher's rows too
    task_report_rows = True  # the divergence to the teacher and the prompt tokens beside the task scores

    def __init__(self, settings: Any):
        self.teacher_path = str(settings.teacher)
        check_teacher_path(self.teacher_path)  # a bad path: one line, before anything is loaded
        self.prefix = str(settings.teacher_prefix)
        self.divergence, self.beta, self.temperature = str(settings.loss), float(settings.beta), float(
            settings.temperature)
        self.fraction, self.max_new_tokens = float(settings.lambda_), int(settings.max_new_tokens)
        self.needs_reference = self.own_teacher is False
        self.teacher: Teacher | None = None  # loaded by `prepare_teacher`
        self.tokenizer = None
        self._pretrained: nnx.Module | None = None  # full fine-tuning with teacher=self: the step-0 model
        self._policy: tuple | None = None  # (graphdef, frozen) of the student: on-policy samples (`bind_policy`)
        self._report_examples = 0  # eval.max_examples (read_data): the held-out examples the report's row reads
        self.teacher_len: int | None = None  # the teacher's row length (read_data; packed: data.seq_len)

    @property
    def own_teacher(self) -> bool:
        """The teacher is another model (not the student's own base)."""
        return self.teacher_path != SELF

    def reference(self, start_copy_is_free: bool) -> Reference:
        return Reference.NONE if self.own_teacher else super().reference(start_copy_is_free)

    def read_data(self, run: Any, tokenizer: Any, vocab_size: int | None, replay: tuple | None = None) -> Any:
        d, e = run.data, run.eval_settings.eval
        if self.own_teacher:
            check_teacher_fits(self.teacher_path, vocab_size, tokenizer)
        self.tokenizer = tokenizer
        self._report_examples = int(e.max_examples)  # the report's row: the examples its task scores read
        self._model = run.model  # the dtypes a teacher of its own is read in (scripts/eval.py's report)
        prefix = TeacherPrefix(self.prefix, d.train, e.few_shot, run.schedule.seed, d.fields)
        data = build_distill_datasets(d, run.schedule.seed, tokenizer, prefix, vocab_size=vocab_size)
        self.teacher_len = data.train.teacher_len
        return data

    def prepare_teacher(self, run: Any, mesh: Any, rules: dict, pretrained: nnx.Module | None) -> Teacher | None:
        """The teacher's weights when it is a model of its own (placed like the frozen weights), else None;
        `pretrained`: the step-0 model under full fine-tuning (the self teacher of the report's rows)."""
        self._pretrained = pretrained
        if self.own_teacher and self.teacher is None:
            m = run.model
            self.teacher = load_teacher(self.teacher_path, m.dtype, m.param_dtype, m.frozen_cast, mesh, rules)
        return self.teacher

    def bind_policy(self, graphdef: nnx.GraphDef, frozen: Any) -> None:
        self._policy = (graphdef, frozen)

    def batches(self, train: Any, batch_size: int, seed: int, sharding: Any, prefetch: int) -> BatchSource:
        if not self.fraction:
            return super().batches(train, batch_size, seed, sharding, prefetch)
        if self._policy is None:
            raise ValueError("on-policy distillation (distill.lambda_ > 0) samples from the student: bind_policy first")
        return OnPolicyBatches(train_iterator(train, batch_size, seed=seed, prefetch=prefetch), *self._policy,
                               self.tokenizer, sharding, seed=seed, fraction=self.fraction,
                               temperature=self.temperature, max_new_tokens=self.max_new_tokens)

    def terms(self, spec: TermSpec) -> list[Term]:
        return [distill_term(self.divergence, self.beta, self.temperature, spec.loss_chunk)]

    def held_out(self, graphdef: nnx.GraphDef, terms: list[Term], loss_chunk: int
                 ) -> Callable[[Any, Any, Any], float]:
        sums = make_terms_eval(graphdef, terms, self.teacher.graphdef if self.teacher is not None else None)
        weights = [t.weight for t in terms]
        return lambda trainable, frozen, batches: eval_loss(sums, trainable, frozen, batches, weights)

    def memory(self, shapes: MemoryShapes, reference: Reference) -> dict[str, int]:
        """The teacher's weights (a model of its own), its forward pass over its rows (as long as its longest
        example once the data is read, else data.seq_len: a lower bound without packing), the sampler's KV cache."""
        out = super().memory(shapes, reference)
        teacher = shapes.model
        if self.own_teacher:
            out["teacher"] = teacher_bytes(self.teacher_path, shapes.model, shapes.frozen + shapes.trainable)
            teacher = model_config(self.teacher_path)
        out["teacher_activations"] = shapes.forward(teacher, self.teacher_len or shapes.seq_len)
        if self.fraction:  # the sampler's KV cache over a batch of rows
            m = shapes.model
            out["rollout_kv_cache"] = (2 * m.num_layers * m.num_kv_heads * m.head_dim * shapes.rows
                                       * (shapes.seq_len + self.max_new_tokens) * shapes.itemsize)
            if shapes.generation_weights:
                out["rollout_weights"] = shapes.generation_weights
        return out

    def _teacher_of(self, model: nnx.Module) -> nnx.Module | None:
        """The teacher the report compares `model` with: its own, or the base of `model` (LoRA: adapters off;
        full fine-tuning: the step-0 model)."""
        if self.teacher is not None:
            return self.teacher.module()
        if self.own_teacher:  # scripts/eval.py: no train step placed it
            self.teacher_module = getattr(self, "teacher_module", None) or load_model(
                self.teacher_path, self._model.dtype, param_dtype=self._model.param_dtype)
            return self.teacher_module
        if has_adapters(model):
            return base_view(model)
        return self._pretrained if self._pretrained is not None else model

    def report_rows(self, eval_rows: Any, batch_size: int, loss_chunk: int) -> ReportRows | None:
        if eval_rows is None:
            return None
        n = min(len(eval_rows.pairs), self._report_examples or len(eval_rows.pairs))
        student_tokens, teacher_tokens = (float(np.mean(x[:n])) for x in eval_rows.pairs.prompt_tokens())
        sums = _divergence_sums(self.divergence, self.beta, self.temperature, loss_chunk)
        first = DistillRows(eval_rows.pairs.take(np.arange(n)), eval_rows.seq_len, eval_rows.teacher_len,
                            *group_rows(np.ones(n, np.int64), 1, False))  # the first n examples, one a row
        rows = list(eval_iterator(first, batch_size))

        def measure(model: nnx.Module) -> dict:
            teacher = self._teacher_of(model)
            total, weight = 0.0, 0.0
            for batch in rows:
                s, w = sums(*nnx.split(model), *nnx.split(teacher), batch)
                total, weight = total + float(s), weight + float(w)
            return {"divergence": total / max(weight, 1.0), "replies": n,
                    "prompt_tokens": student_tokens, "teacher_prompt_tokens": teacher_tokens}

        what = {"forward_kl": "KL(teacher || model)", "reverse_kl": "KL(model || teacher)"}.get(
            self.divergence, f"generalized JSD (beta {self.beta:g})")

        def table(section: dict) -> list[list[str]]:
            from ftjax.evaluation.report import fmt

            base, tuned = section.get("base") or {}, section.get("finetuned") or {}
            n = (tuned or base).get("replies")
            return [[f"{what} per reply token, {n} held-out replies", fmt(base.get("divergence")),
                     fmt(tuned.get("divergence"))],
                    [f"prompt tokens per query (the teacher's: {teacher_tokens:.1f})", f"{student_tokens:.1f}",
                     f"{student_tokens:.1f}"]]

        return ReportRows("distill", measure, table, f"distillation: {what} to the teacher on held-out replies",
                          lambda measured: {"distill_divergence": measured["divergence"]})


def _divergence_sums(divergence: str, beta: float, temperature: float, chunk: int):
    """jit((student graph, state, teacher graph, state, batch) -> (Σ w·divergence, Σ w)), as the step computes it."""

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def sums(student_graph, student_state, teacher_graph, teacher_state, batch):
        student = nnx.merge(student_graph, student_state)
        teacher = nnx.merge(teacher_graph, teacher_state)
        tb = batch[TEACHER]
        t_pass = Forward(teacher, teacher.hidden(tb["input_ids"], tb["positions"], tb["segment_ids"]), tb)
        s_pass = Forward(student, student.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"]),
                         batch, teacher=t_pass)
        return distill_forward_sums(s_pass, divergence, beta, temperature, chunk)

    return sums

