"""What an objective says to the run: its data, its batches, its loss terms, the reference it needs, its held-out
metric and report rows. The loop, the evaluation and the report ask it; none compares names."""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Any, Callable

from flax import nnx

from ftjax import data as data_lib
from ftjax.objectives.held_out import eval_loss, make_terms_eval
from ftjax.objectives.sources import BatchSource, DatasetBatches
from ftjax.objectives.terms import Term


class Reference(enum.Enum):
    """What a loss compares the policy with: nothing, the same model with its adapters off (LoRA: no copy), a
    frozen copy of the step-0 trainable weights, or the reference's log-probs computed once before training."""

    NONE = "none"
    ADAPTERS_OFF = "adapters off"
    FROZEN_COPY = "frozen copy"
    CACHE = "cache"


@dataclasses.dataclass(frozen=True)
class ReportRows:
    """The report's rows an objective adds: `measure(model)` on held-out data for the base and the tuned model,
    kept in report.json under `key`; `table(section)` the rows [label, base, fine-tuned]; `about` what the
    before / after compares; `tracked(measured)` what a periodic eval logs of it."""

    key: str
    measure: Callable[[nnx.Module], dict]
    table: Callable[[dict], list[list[str]]]
    about: str
    tracked: Callable[[dict], dict]


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """What terms are built from: the logits chunk, the row length and the reference the run provides."""

    loss_chunk: int
    seq_len: int
    reference: Reference = Reference.NONE


@dataclasses.dataclass(frozen=True)
class MemoryShapes:
    """Per device, what an objective's own memory needs are computed from (ftjax.train.memory fills it in)."""

    model: Any  # ftjax.models.ModelConfig of the trained model
    rows: int  # training rows per device in one micro-batch
    seq_len: int
    itemsize: int  # bytes of the compute dtype
    trainable: int  # bytes of the trainable weights on one device
    frozen: int  # bytes of the frozen weights on one device
    activations: int  # bytes of the SFT step's activations on one device
    # bytes on one device of a forward-only pass (no gradient) of a model of that ModelConfig over the step's rows,
    # `length` tokens each (ftjax.train.memory.forward_bytes): a teacher's pass
    forward: Callable[[Any, int], int]
    # bytes on one device of the layer weights that generation folds dense once per call where it unrolls the
    # layers (a one-device CPU: ftjax.generate.unrolled_decode), 0 elsewhere: a sampler's (rollouts') extra copy
    generation_weights: int = 0


class Objective(abc.ABC):
    """One training objective. Subclasses set `name`, read their data and give their terms."""

    name: str
    needs_reference: bool = False  # its loss compares with the model before training
    # without a free step-0 model: its values cached (True: it defines `with_reference(...)`, which returns its
    # data carrying the reference's values) or a frozen copy of the step-0 weights kept (False)
    caches_reference: bool = False
    generation_task: bool = True  # its held-out records are generation examples (task scores in the report)
    # its held-out figure is the cross-entropy the report's eval-loss rows measure: the report can give its last point
    held_out_is_report_eval_loss: bool = False
    segments_per_example: int = 1  # segments one example takes in a row (a preference pair: its two replies)
    compiles_from_shapes: bool = True  # its batches are plain rows (BATCH_KEYS): a step compiles from shapes alone
    replay_mixes_in: bool = True  # forget.replay_fraction may mix SFT replay examples into its data
    # its report rows (`report_rows`) read its own held-out rows beside a generation task's scores
    task_report_rows: bool = False

    @abc.abstractmethod
    def read_data(self, run: Any, tokenizer: Any, vocab_size: int | None, replay: tuple | None = None) -> Any:
        """Train / eval rows and their summary (`ftjax.data.Datasets`-like) for the composed `run`
        (`ftjax.train.compose.Run`), every record checked up front; `replay`: (file, fraction) mixed in."""

    def bind_policy(self, graphdef: nnx.GraphDef, frozen: Any) -> None:
        """The model the steps train (its graphdef and frozen arrays, the step's own): a source that samples from
        the policy (`batches`) generates with these and the trainable weights `next` is handed. Default: unused."""

    def batches(self, train: Any, batch_size: int, seed: int, sharding: Any, prefetch: int) -> BatchSource:
        """Where the steps' batches come from: by default the train rows, shuffled, as sharded global batches."""
        return DatasetBatches(data_lib.train_iterator(train, batch_size, seed=seed, sharding=sharding,
                                                      prefetch=prefetch))

    def prepare_teacher(self, run: Any, mesh: Any, rules: dict, pretrained: nnx.Module | None) -> Any:
        """A teacher model of its own, loaded and placed (`.graphdef`, `.params`, `.shardings`: the step reads
        its weights as `Frozen.teacher`), or None (most objectives; a teacher that is the model before training)."""
        return None

    def reference(self, start_copy_is_free: bool) -> Reference:
        """The reference this objective gets from a method whose step-0 model is free (LoRA: adapters off) or not
        (full: the reference's values computed once and cached, or a frozen copy of the step-0 weights)."""
        if not self.needs_reference:
            return Reference.NONE
        if start_copy_is_free:
            return Reference.ADAPTERS_OFF
        return Reference.CACHE if self.caches_reference else Reference.FROZEN_COPY

    @abc.abstractmethod
    def terms(self, spec: TermSpec) -> list[Term]:
        """Its loss terms (the first is `loss`, the logged objective value)."""

    def held_out(self, graphdef: nnx.GraphDef, terms: list[Term], loss_chunk: int
                 ) -> Callable[[Any, Any, Any], float]:
        """(trainable, frozen: train.step.Frozen, eval batches) -> the held-out loss: its own terms on eval data,
        each read as the step reads it, weighted as in training."""
        sums = make_terms_eval(graphdef, terms)
        weights = [t.weight for t in terms]
        return lambda trainable, frozen, batches: eval_loss(sums, trainable, frozen, batches, weights)

    def memory(self, shapes: MemoryShapes, reference: Reference) -> dict[str, int]:
        """Bytes per device it adds to the SFT step's (label -> bytes): a frozen reference copy, a teacher, the
        rollouts' KV cache. The memory estimate adds these; by default a frozen copy of the trainable weights."""
        return {"reference_copy": shapes.trainable} if reference is Reference.FROZEN_COPY else {}

    def report_rows(self, eval_rows: Any, batch_size: int, loss_chunk: int) -> ReportRows | None:
        """The report rows it adds beyond the task scores and forgetting (None: none)."""
        return None
