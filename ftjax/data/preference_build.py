"""From the run's data part (`ftjax.data.spec.DataSpec`) and a tokenizer to train/eval rows of preference pairs and
a summary, every check up front.

The same order and policies as `ftjax.data.build.build_datasets` (read + validate -> tokenize once, cached ->
vocab check -> eval split -> overlong -> dropped-fraction check -> mixture -> packing), on whole pairs.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from ftjax.data.examples import Examples
from ftjax.data.fingerprint import digest_key, tokenizer_fingerprint
from ftjax.data.mixture import mixture_indices
from ftjax.data.pair_rows import PairRows, make_pair_rows
from ftjax.data.preference import PairExamples, PreferenceFields, fit_pairs, read_pairs, read_pairs_tfds, tokenize_pairs
from ftjax.data.sources import check_vocab, eval_hold_out, run_sources, source_fingerprint, source_label
from ftjax.data.spec import DataSpec
from ftjax.data.summary import DataSummary
from ftjax.data.token_cache import cached_examples
from ftjax.errors import DataError


@dataclasses.dataclass
class PreferenceDatasets:
    """Train rows, eval rows (None without eval data) and the summary (examples counted in pairs)."""

    train: PairRows
    eval: PairRows | None
    summary: DataSummary


def _load(how: dict, d: DataSpec, tokenizer: Any, tok_fp: str, fields: PreferenceFields):
    """(read result, tokenized pairs, fingerprint) of one source; tokens cached by content key."""
    fp = source_fingerprint(how)
    if how["kind"] == "file":
        read = read_pairs(how["path"], fields, d.on_bad_record)
    else:
        read = read_pairs_tfds(how["name"], how["split"], how["data_dir"], fields, d.on_bad_record)
    key = digest_key("preference", fp["sha256"], source_label(how), tok_fp, dataclasses.astuple(fields),
                     d.on_bad_record)
    pairs = None

    def half(name: str) -> Examples:
        nonlocal pairs
        if pairs is None:
            pairs = tokenize_pairs(read.records, tokenizer)
        return getattr(pairs, name)

    cache = d.cache_dir or None
    return read, PairExamples(cached_examples(key + "-chosen", lambda: half("chosen"), cache),
                              cached_examples(key + "-rejected", lambda: half("rejected"), cache)), fp


def _concat(parts: list[PairExamples]) -> PairExamples:
    return PairExamples(Examples.concat([p.chosen for p in parts]), Examples.concat([p.rejected for p in parts]))


def build_preference_datasets(data: DataSpec, tokenizer: Any, *, vocab_size: int | None = None,
                              fields: PreferenceFields = PreferenceFields()) -> PreferenceDatasets:
    """Train and eval rows of whole pairs from the run's data part (its `data.*` keys and seed); DataError names
    file:line."""
    d, seed = data, int(data.seed)
    tok_fp = tokenizer_fingerprint(tokenizer)
    train_specs, eval_spec = run_sources(d)
    sources = [(label, w, *_load(how, d, tokenizer, tok_fp, fields)) for label, w, how in train_specs]
    ev = (source_label(eval_spec), 1.0, *_load(eval_spec, d, tokenizer, tok_fp, fields)) if eval_spec else None

    summary = DataSummary(seq_len=int(d.seq_len))
    dropped, first = collections.Counter(), {}
    for label, _, read, pairs, fp in sources + ([ev] if ev else []):
        check_vocab(pairs.chosen, vocab_size)
        check_vocab(pairs.rejected, vocab_size)
        summary.records += read.total
        dropped.update(read.dropped)
        for reason, where in read.first_dropped.items():
            first.setdefault(reason, where)
        summary.fingerprints[label] = fp

    train_parts, held_out, truncated = [], [], 0
    for k, (_, _, _, pairs, _) in enumerate(sources):
        if ev is None and d.eval_fraction > 0:
            keep, hold = eval_hold_out(pairs.chosen, float(d.eval_fraction), seed, k)
            held_out.append(pairs.take(hold))
            pairs = pairs.take(keep)
        pairs, t = fit_pairs(pairs, int(d.seq_len), d.overlong, dropped, first)
        train_parts.append(pairs)
        truncated += t
    eval_pairs = ev[3] if ev else (_concat(held_out) if held_out else None)
    if eval_pairs is not None:
        eval_pairs, t = fit_pairs(eval_pairs, int(d.seq_len), d.overlong, dropped, first)
        truncated += t

    summary.dropped, summary.first_dropped, summary.truncated = dict(dropped), first, truncated
    summary.check_dropped(float(d.max_dropped_fraction), "preference records")

    idx = mixture_indices([len(p) for p in train_parts], [w for _, w, *_ in sources], seed)
    train = _concat([p.take(i) for p, i in zip(train_parts, idx)])
    if not len(train):
        raise DataError("no preference pairs are left after validation and the overlong policy")
    order = np.random.default_rng([seed, 0x7061636B]).permutation(len(train))
    train_rows = make_pair_rows(train, int(d.seq_len), bool(d.packing), order, int(d.max_segments))
    eval_rows = (make_pair_rows(eval_pairs, int(d.seq_len), bool(d.packing), max_segments=int(d.max_segments))
                 if eval_pairs is not None and len(eval_pairs) else None)

    summary.train_examples, summary.train_rows = len(train), len(train_rows)
    summary.tokens = train_rows.positions_used()
    summary.trained_tokens = int(train.chosen.trained_targets().sum() + train.rejected.trained_targets().sum())
    summary.packing_efficiency = train_rows.efficiency()
    if eval_rows is not None:
        summary.eval_examples, summary.eval_rows = len(eval_pairs), len(eval_rows)
    summary.sources = [dict(path=label, weight=w, records=read.total, examples=int(len(i)))
                       for (label, w, read, _, _), i in zip(sources, idx)]
    return PreferenceDatasets(train_rows, eval_rows, summary)
