"""Distillation rows: every example twice, as the student sees it (its prompt, its reply) and as the teacher sees it
(the teacher's prefix, the same prompt, the same reply), laid out in the same rows in the same order.

Both are tokenized on the final reply only (data.loss_on=last_assistant: the prefix's example replies are the
teacher's context, never a target), and each example's reply tokens must come out the same on both sides, so the
k-th trained position of a student row and of its teacher row predict the same token: the step aligns them by
that rank (`ftjax.objectives.distill_term`). One example a row (data.packing=false): the student's rows are
data.seq_len long, the teacher's as long as its longest example (rounded up to a multiple of 8), so the student's
pass pays nothing for the teacher's prefix. Packed: both sides in rows of data.seq_len, an example taking the
positions of its longer side. An example too long for a row is dropped (data.overlong=drop or truncate: a cut reply
would not be the same on both sides) or an error (error).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from ftjax.data.build import Datasets
from ftjax.data.examples import Examples
from ftjax.data.fingerprint import digest_key, tokenizer_fingerprint
from ftjax.data.mixture import mixture_indices
from ftjax.data.packing import PackedRows, group_rows
from ftjax.data.records import read_file
from ftjax.data.sources import check_vocab, eval_hold_out, run_sources, source_fingerprint, source_label
from ftjax.data.summary import DataSummary
from ftjax.data.token_cache import cached_examples
from ftjax.data.tokenize import tokenize_records
from ftjax.errors import DataError
from ftjax.objectives.distill_prefix import TeacherPrefix

TEACHER = "teacher"  # the batch's stream the teacher reads (`batch["teacher"]`)


@dataclasses.dataclass
class Pairs:
    """The same examples as the student and as the teacher sees them (index i is one example on both sides)."""

    student: Examples
    teacher: Examples

    def __len__(self) -> int:
        return len(self.student)

    def take(self, index) -> "Pairs":
        return Pairs(self.student.take(index), self.teacher.take(index))

    @staticmethod
    def concat(parts) -> "Pairs":
        return Pairs(Examples.concat([p.student for p in parts]), Examples.concat([p.teacher for p in parts]))

    def positions(self, packing: bool = True) -> np.ndarray:
        """Row positions each example takes: its longer side (packed), or the student's (one example a row)."""
        return (np.maximum(self.student.lengths, self.teacher.lengths) if packing else self.student.lengths) - 1

    def prompt_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(student, teacher) prompt tokens per example: the tokens before its first trained one."""
        return prompt_lengths(self.student), prompt_lengths(self.teacher)


def prompt_lengths(ex: Examples) -> np.ndarray:
    return np.array([int(np.argmax(ex.tokens(i)[1])) for i in range(len(ex))], np.int64)


def reply_tokens(ex: Examples, i: int) -> np.ndarray:
    ids, trained = ex.tokens(i)
    return ids[trained]


@dataclasses.dataclass
class DistillRows:
    """Row r holds examples `items[offsets[r]:offsets[r+1]]` on both sides; duck-types `PackedRows` for the
    loaders, its batches the student's arrays with the teacher's under `batch["teacher"]`."""

    pairs: Pairs
    seq_len: int  # the student's rows
    teacher_len: int  # the teacher's rows
    offsets: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def side(self, which: str) -> PackedRows:
        return PackedRows(getattr(self.pairs, which), self.teacher_len if which == TEACHER else self.seq_len,
                          self.offsets, self.items)

    def batch(self, rows) -> dict:
        return {**self.side("student").batch(rows), TEACHER: self.side(TEACHER).batch(rows)}

    def positions_used(self) -> int:
        return self.side("student").positions_used()

    def efficiency(self) -> float:
        return self.side("student").efficiency()


def _pairs(how: dict, d: Any, tokenizer: Any, tok_fp: str, prefix: TeacherPrefix):
    """(read result, Pairs, fingerprint) of one source: its chat records, tokenized on both sides (cached)."""
    fields = d.fields
    fp = source_fingerprint(how)
    if how["kind"] != "file":
        raise DataError(f"{source_label(how)}: objective=distill reads data files (data.train / data.eval), not TFDS")
    read = read_file(how["path"], fields, d.on_bad_record)
    for r in read.records:
        if r.kind == "text":
            raise DataError(f"{r.source}: a text record has no reply to distill; objective=distill needs messages or "
                            "prompt/completion records")
    key = digest_key("distill", fp["sha256"], source_label(how), tok_fp, dataclasses.astuple(fields), d.on_bad_record)
    cache = d.cache_dir or None
    student = cached_examples(key + "-student", lambda: tokenize_records(read.records, tokenizer, "last_assistant"),
                              cache)
    teacher = cached_examples(digest_key(key, *prefix.identity()) + "-teacher",
                              lambda: tokenize_records(prefix.teacher_records(read.records), tokenizer,
                                                       "last_assistant"), cache)
    for i in range(len(student)):
        if not np.array_equal(reply_tokens(student, i), reply_tokens(teacher, i)):
            raise DataError(f"{student.source(i)}: the reply tokenizes differently after the teacher's prefix "
                            f"(distill.teacher_prefix={prefix.spec}), so its tokens cannot be aligned")
    return read, Pairs(student, teacher), fp


def _fit(pairs: Pairs, d: Any, dropped: collections.Counter, first: dict) -> Pairs:
    """Drop (or, data.overlong=error, refuse) examples longer than a row (see the module docstring)."""
    over = pairs.positions(bool(d.packing)) > int(d.seq_len)
    if over.any():
        k = int(np.flatnonzero(over)[0])
        if d.overlong == "error":
            raise DataError(f"{pairs.student.source(k)}: the example takes {int(pairs.positions(bool(d.packing))[k])} "
                            f"positions (packed: its teacher's side), more than data.seq_len={d.seq_len} allows; "
                            "raise data.seq_len or set data.overlong=drop")
        dropped["overlong"] += int(over.sum())
        first.setdefault("overlong", pairs.student.source(k))
    return pairs.take(np.flatnonzero(~over))


def build_distill_datasets(d: Any, seed: int, tokenizer: Any, prefix: TeacherPrefix, *,
                           vocab_size: int | None = None) -> Datasets:
    """Train and eval rows (`DistillRows`) of (student, teacher) examples from the run's data part `d`
    (`ftjax.data.spec.DataSpec`) and seed, every check before any compute."""
    seed = int(seed)
    tok_fp = tokenizer_fingerprint(tokenizer)
    train_specs, eval_spec = run_sources(d)
    sources = [(label, w, *_pairs(how, d, tokenizer, tok_fp, prefix)) for label, w, how in train_specs]
    ev = (source_label(eval_spec), 1.0, *_pairs(eval_spec, d, tokenizer, tok_fp, prefix)) if eval_spec else None

    summary = DataSummary(seq_len=int(d.seq_len))
    for label, _, read, pairs, fp in sources + ([ev] if ev else []):
        check_vocab(pairs.teacher, vocab_size)
        check_vocab(pairs.student, vocab_size)
        summary.count_source(label, read, fp)
    dropped, first = collections.Counter(summary.dropped), dict(summary.first_dropped)

    train_parts, held_out = [], []
    for k, (_, _, _, pairs, _) in enumerate(sources):
        if ev is None and d.eval_fraction > 0:
            keep, hold = eval_hold_out(pairs.student, float(d.eval_fraction), seed, k)
            held_out.append(pairs.take(hold))
            pairs = pairs.take(keep)
        train_parts.append(_fit(pairs, d, dropped, first))
    eval_pairs = ev[3] if ev else (Pairs.concat(held_out) if held_out else None)
    if eval_pairs is not None:
        eval_pairs = _fit(eval_pairs, d, dropped, first)
    summary.dropped, summary.first_dropped = dict(dropped), first
    summary.check_dropped(float(d.max_dropped_fraction))

    idx = mixture_indices([len(p) for p in train_parts], [w for _, w, *_ in sources], seed)
    train = Pairs.concat([p.take(i) for p, i in zip(train_parts, idx)])
    if not len(train):
        raise DataError("no training examples are left after validation and the overlong policy")
    order = np.random.default_rng([seed, 0x7061636B]).permutation(len(train))
    cap, packing, seq_len = int(d.max_segments), bool(d.packing), int(d.seq_len)
    teacher_len = seq_len
    if not packing:  # the teacher's rows: its longest example, train or eval
        longest = max(int(p.teacher.lengths.max()) - 1 for p in (train, eval_pairs) if p is not None and len(p))
        teacher_len = -(-longest // 8) * 8
    train_rows = DistillRows(train, seq_len, teacher_len,
                             *group_rows(train.positions(packing), seq_len, packing, order, cap))
    eval_rows = None
    if eval_pairs is not None and len(eval_pairs):
        eval_rows = DistillRows(eval_pairs, seq_len, teacher_len,
                                *group_rows(eval_pairs.positions(packing), seq_len, packing, max_items=cap))
        summary.eval_examples, summary.eval_rows = len(eval_pairs), len(eval_rows)
    summary.train_examples, summary.train_rows = len(train), len(train_rows)
    summary.tokens = train_rows.positions_used()
    summary.trained_tokens = int(train.student.trained_targets().sum())
    summary.packing_efficiency = train_rows.efficiency()
    summary.sources = [dict(path=label, weight=w, records=read.total, examples=int(len(i)))
                       for (label, w, read, _, _), i in zip(sources, idx)]
    return Datasets(train_rows, eval_rows, summary)
