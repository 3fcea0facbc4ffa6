"""Preference objectives (DPO, robust DPO, IPO, ORPO, SimPO) on (prompt, chosen, rejected) pairs.

The loss is per pair (ftjax/objectives/pair_losses.py), read from the step's own pass; DPO / IPO compare with a
reference: the model with its adapters off (LoRA, no copy), the starting adapter kept as a copy (an adapter
continued from a workdir), or log-probs computed once before training (full fine-tuning: `reference_cache`).
ORPO adds its NLL term on the chosen replies; `pref.sft_weight` adds the same term to the others.
"""

from __future__ import annotations

from typing import Any


from ftjax.data.preference_build import build_preference_datasets
from ftjax.objectives.objective import Objective, Reference, ReportRows, TermSpec
from ftjax.objectives.pair_losses import METRICS, PreferenceConfig
from ftjax.objectives.preference_term import forward_sums, global_pairs, held_out_accuracy, max_pairs_of
from ftjax.objectives.reference_cache import with_reference
from ftjax.objectives.reply_logps import chosen_weights
from ftjax.objectives.terms import BatchTerm, Forward, Term, cross_entropy_of, total_weight


def preference_loss(cfg: PreferenceConfig, chunk: int, seq_len: int, reference: Reference) -> BatchTerm:
    """The loss per pair of the global batch, TRL's metrics beside it. `reference`: read from the reference pass
    (adapters off, or a frozen copy), from the batch's cached `ref_logps`, or none (ORPO, SimPO)."""
    max_pairs = max_pairs_of(seq_len)
    read = {Reference.ADAPTERS_OFF: "pass", Reference.FROZEN_COPY: "pass", Reference.CACHE: "cache"}.get(reference)

    def fn(f: Forward):
        sums = forward_sums(cfg, f, max_pairs, chunk, read)
        return sums["loss"], sums

    return BatchTerm("loss", fn, reads_reference=read == "pass", normalizer=global_pairs, metrics=METRICS)


def chosen_cross_entropy(weight: float, chunk: int) -> BatchTerm:
    """Cross-entropy on the chosen replies of a preference batch (its odd segments' `loss_weights`): ORPO's NLL
    term, or `pref.sft_weight` added to DPO / IPO / SimPO; normalized by the chosen replies' total weight."""
    return BatchTerm("nll_loss", cross_entropy_of(chosen_weights, chunk), weight,
                     normalizer=lambda batch: total_weight(batch, chosen_weights(batch)))


def preference_table(section: dict) -> list[list[str]]:
    """The report's rows: held-out preference accuracy and mean log-prob margin, base and fine-tuned."""
    from ftjax.evaluation.report import fmt

    base, tuned = section.get("base") or {}, section.get("finetuned") or {}
    n = (tuned or base).get("pairs")
    return [[f"preference accuracy ({n} held-out pairs)", fmt(base.get("accuracy"), True),
             fmt(tuned.get("accuracy"), True)],
            ["mean log-prob margin, chosen - rejected", fmt(base.get("margin")), fmt(tuned.get("margin"))]]


class Preference(Objective):
    """One of dpo, ipo, orpo, simpo with the run's `pref.*`."""

    generation_task = False  # its held-out data are pairs, scored by preference accuracy
    replay_mixes_in = False
    caches_reference = True  # full fine-tuning: the reference's pair log-probs computed once (with_reference)
    segments_per_example = 2  # chosen and rejected, each its own segment
    compiles_from_shapes = False  # pairs (and a cached reference under full fine-tuning) have no shape-only batch yet

    def __init__(self, name: str, pref: Any):
        self.name = name
        self.cfg = PreferenceConfig(name, float(pref.beta), float(pref.label_smoothing), float(pref.gamma))
        self.nll_weight = 1.0 if name == "orpo" else float(pref.sft_weight)
        self.needs_reference = self.cfg.needs_reference

    def read_data(self, run: Any, tokenizer: Any, vocab_size: int | None, replay: tuple | None = None) -> Any:
        return build_preference_datasets(run.data, tokenizer, vocab_size=vocab_size)

    def with_reference(self, data: Any, model: Any, batch_size: int, loss_chunk: int, workdir: Any,
                       identity: dict, say) -> Any:
        return with_reference(identity, workdir, model, data, batch_size, loss_chunk, say)

    def terms(self, spec: TermSpec) -> list[Term]:
        terms: list[Term] = [preference_loss(self.cfg, spec.loss_chunk, spec.seq_len, spec.reference)]
        return terms + ([chosen_cross_entropy(self.nll_weight, spec.loss_chunk)] if self.nll_weight else [])

    def report_rows(self, eval_rows: Any, batch_size: int, loss_chunk: int) -> ReportRows | None:
        if eval_rows is None:
            return None
        cfg = self.cfg
        return ReportRows("preference", lambda model: held_out_accuracy(cfg, model, eval_rows, batch_size, loss_chunk),
                          preference_table, "preference accuracy on held-out pairs",
                          lambda measured: {"pref_accuracy": measured["accuracy"]})
