"""Supervised fine-tuning: token-weighted cross-entropy on the replies (or all text) of the train records."""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from ftjax import data as data_lib
from ftjax.objectives.held_out import eval_loss, make_eval_loss
from ftjax.objectives.objective import Objective, TermSpec
from ftjax.objectives.terms import Term, cross_entropy


class Sft(Objective):
    name = "sft"
    held_out_is_report_eval_loss = True

    def __init__(self, pref: Any = None):
        """`pref` (the run's pref.* group) does not apply to SFT."""

    def read_data(self, run: Any, tokenizer: Any, vocab_size: int | None, replay: tuple | None = None) -> Any:
        return data_lib.build_datasets(run.data, tokenizer, vocab_size=vocab_size, replay=replay)

    def terms(self, spec: TermSpec) -> list[Term]:
        return [cross_entropy(spec.loss_chunk)]

    def held_out(self, graphdef: nnx.GraphDef, terms: list[Term], loss_chunk: int
                 ) -> Callable[[Any, Any, Any], float]:
        """The mean cross-entropy per trained token of the eval rows (the frozen weights alone: no reference)."""
        sums = make_eval_loss(graphdef, loss_chunk)
        return lambda trainable, frozen, batches: eval_loss(sums, trainable, frozen.model, batches)
