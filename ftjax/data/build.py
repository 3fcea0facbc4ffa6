"""From the run's data part (`ftjax.data.spec.DataSpec`) and a tokenizer to train/eval rows and a summary, with
every check done up front.

Order: read + validate every record (file:line errors) -> tokenize once (cached) -> vocab check ->
eval split -> overlong policy -> dropped-fraction check -> mixture (+ replay) -> packing -> summary. Nothing
here touches a model or a device, so bad data stops the run before any compute.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from ftjax.data.examples import Examples
from ftjax.data.fingerprint import digest_key, tokenizer_fingerprint
from ftjax.data.mixture import mixture_indices, replay_indices
from ftjax.data.packing import PackedRows, make_rows
from ftjax.data.records import ReadResult, read_file
from ftjax.data.sources import check_vocab, eval_hold_out, run_sources, source_fingerprint, source_label
from ftjax.data.spec import DataSpec
from ftjax.data.summary import DataSummary
from ftjax.data.token_cache import cached_examples
from ftjax.data.tokenize import tokenize_records
from ftjax.errors import DataError

OVERLONG = "overlong"
NO_TRAINED = "no trained tokens"


@dataclasses.dataclass
class Datasets:
    """What the trainer gets: train rows, eval rows (None without eval data) and the summary."""

    train: PackedRows
    eval: PackedRows | None
    summary: DataSummary


@dataclasses.dataclass
class _Source:
    label: str  # file path or tfds:name/split
    weight: float
    read: ReadResult
    examples: Examples
    fingerprint: dict[str, Any]


def data_fingerprints(data: DataSpec) -> dict[str, dict[str, Any]]:
    """Size + SHA-256 of every data source the run names (label -> fingerprint), for resume checks."""
    train, ev = run_sources(data)
    hows = [h for _, _, h in train] + ([ev] if ev else [])
    return {source_label(h): source_fingerprint(h) for h in hows}


def _load(how: dict, weight: float, d: DataSpec, tokenizer: Any, tok_fp: str) -> _Source:
    """Read and validate all records of one source, then tokenize them (once; cached by content key)."""
    fields = d.fields
    fp = source_fingerprint(how)
    if how["kind"] == "file":
        read = read_file(how["path"], fields, d.on_bad_record)
    else:
        from ftjax.data.tfds_source import read_tfds

        read = read_tfds(how["name"], how["split"], how["data_dir"], fields, d.on_bad_record)
    key = digest_key(fp["sha256"], source_label(how), tok_fp, d.loss_on, dataclasses.astuple(fields), d.on_bad_record)
    examples = cached_examples(key, lambda: tokenize_records(read.records, tokenizer, d.loss_on),
                               d.cache_dir or None)
    return _Source(source_label(how), weight, read, examples, fp)


def _fit(examples: Examples, d: DataSpec, dropped: collections.Counter, first: dict) -> tuple[Examples, int]:
    """Apply data.overlong (drop | truncate | error) and drop examples left with no trained target."""
    seq_len, positions = int(d.seq_len), examples.lengths - 1
    over = positions > seq_len
    truncated = 0
    if over.any():
        k = int(np.flatnonzero(over)[0])
        if d.overlong == "error":
            raise DataError(f"{examples.source(k)}: example has {int(examples.lengths[k])} tokens, more than "
                            f"data.seq_len={seq_len} (+1 for the shifted target) allows; set data.overlong=drop "
                            f"or truncate, or raise data.seq_len")
        if d.overlong == "truncate":
            examples = examples.with_lengths(np.minimum(examples.lengths, seq_len + 1))
            truncated = int(over.sum())
        else:
            dropped[OVERLONG] += int(over.sum())
            first.setdefault(OVERLONG, examples.source(k))
            examples = examples.take(np.flatnonzero(~over))
    empty = examples.trained_targets() <= 0  # also examples of fewer than 2 tokens
    if empty.any():
        dropped[NO_TRAINED] += int(empty.sum())
        first.setdefault(NO_TRAINED, examples.source(int(np.flatnonzero(empty)[0])))
        examples = examples.take(np.flatnonzero(~empty))
    return examples, truncated


REPLAY_LABEL = "replay"


def _replay_examples(path: str, d: DataSpec, tokenizer: Any, tok_fp: str) -> tuple[_Source, Examples]:
    """The replay file (retain prompts + replies to keep), cut to seq_len+1 tokens; examples without a
    trained token are left out."""
    src = _load(dict(kind="file", path=path), 1.0, d, tokenizer, tok_fp)
    ex = src.examples.with_lengths(np.minimum(src.examples.lengths, int(d.seq_len) + 1))
    return src, ex.take(np.flatnonzero(ex.trained_targets() > 0))


def build_datasets(data: DataSpec, tokenizer: Any, *, vocab_size: int | None = None,
                   replay: tuple[str, float] | None = None) -> Datasets:
    """Train and eval rows from the run's data part (its `data.*` keys and seed), checked before any compute.

    `vocab_size` is the model's; token ids at or above it are an error. Raises DataError naming file:line.
    `replay=(path, fraction)` adds that JSONL's examples to make up `fraction` of the training examples
    (every task example kept; `ftjax.data.mixture.replay_indices`); its fingerprint, with the fraction, joins
    `summary.fingerprints["replay"]` so a resume with other replay data or another fraction is refused.
    """
    d, seed = data, int(data.seed)
    tok_fp = tokenizer_fingerprint(tokenizer)
    train_specs, eval_spec = run_sources(d)
    sources = [_load(how, w, d, tokenizer, tok_fp) for _, w, how in train_specs]
    ev = _load(eval_spec, 1.0, d, tokenizer, tok_fp) if eval_spec else None

    summary = DataSummary(seq_len=int(d.seq_len))
    dropped, first = collections.Counter(), {}
    for s in sources + ([ev] if ev else []):
        check_vocab(s.examples, vocab_size)
        summary.records += s.read.total
        dropped.update(s.read.dropped)
        for reason, where in s.read.first_dropped.items():
            first.setdefault(reason, where)
        summary.fingerprints[s.label] = s.fingerprint

    train_parts, held_out = [], []
    for k, s in enumerate(sources):
        ex = s.examples
        if ev is None and d.eval_fraction > 0:
            keep, hold = eval_hold_out(ex, float(d.eval_fraction), seed, k)
            held_out.append(ex.take(hold))
            ex = ex.take(keep)
        train_parts.append(ex)
    truncated = 0
    for k, ex in enumerate(train_parts):
        train_parts[k], t = _fit(ex, d, dropped, first)
        truncated += t
    eval_examples = ev.examples if ev else (Examples.concat(held_out) if held_out else None)
    if eval_examples is not None:
        eval_examples, t = _fit(eval_examples, d, dropped, first)
        truncated += t

    summary.dropped, summary.first_dropped = dict(dropped), first
    summary.check_dropped(float(d.max_dropped_fraction))
    summary.truncated = truncated  # kept, cut to seq_len+1 tokens; not counted as dropped

    idx = mixture_indices([len(p) for p in train_parts], [s.weight for s in sources], seed)
    train = Examples.concat([p.take(i) for p, i in zip(train_parts, idx)])
    if not len(train):
        raise DataError("no training examples are left after validation and the overlong policy")
    n_task = len(train)
    if replay is not None:
        rep_src, rep = _replay_examples(replay[0], d, tokenizer, tok_fp)
        check_vocab(rep, vocab_size)
        rep_idx = replay_indices(n_task, len(rep), float(replay[1]), seed)
        train = Examples.concat([train, rep.take(rep_idx)])
        summary.fingerprints[REPLAY_LABEL] = {**rep_src.fingerprint, "fraction": float(replay[1])}
    order = np.random.default_rng([seed, 0x7061636B]).permutation(len(train))
    cap = int(d.max_segments)
    train_rows = make_rows(train, int(d.seq_len), bool(d.packing), order, cap)
    eval_rows = make_rows(eval_examples, int(d.seq_len), bool(d.packing), max_segments=cap) if (
        eval_examples is not None and len(eval_examples)) else None

    unique_train = np.concatenate([p.digests for p in train_parts]) if train_parts else np.zeros(0, np.uint64)
    summary.duplicates_train = int(len(unique_train) - len(np.unique(unique_train)))
    if eval_examples is not None:
        summary.duplicates_train_eval = int(np.isin(eval_examples.digests, unique_train).sum())
        summary.eval_examples, summary.eval_rows = len(eval_examples), len(eval_rows) if eval_rows else 0
    summary.train_examples, summary.train_rows = len(train), len(train_rows)
    summary.tokens = train_rows.positions_used()
    summary.trained_tokens = int(train.trained_targets().sum())
    summary.packing_efficiency = train_rows.efficiency()
    summary.sources = [dict(path=s.label, weight=s.weight, records=s.read.total, examples=int(len(i)))
                       for s, i in zip(sources, idx)]
    if replay is not None:
        summary.sources.append(dict(path=rep_src.label, weight=float(replay[1]), records=rep_src.read.total,
                                    examples=len(train) - n_task))
    return Datasets(train_rows, eval_rows, summary)
