"""The data summary printed at start and stored with the run: what was read, dropped, and trained on."""

from __future__ import annotations

import dataclasses
from typing import Any

from ftjax.errors import DataError


@dataclasses.dataclass
class DataSummary:
    """Counts over train and eval data; `dropped` maps reason -> records, `fingerprints` path -> size/hash."""

    records: int = 0  # records read, train and eval sources together
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> first file:line
    truncated: int = 0  # overlong examples kept, cut to seq_len + 1 tokens (data.overlong=truncate)
    train_examples: int = 0  # examples in one pass over the (mixed) training data
    eval_examples: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    seq_len: int = 0
    tokens: int = 0  # non-padding positions in the train rows
    trained_tokens: int = 0  # positions whose target is trained (loss weight 1)
    packing_efficiency: float = 0.0  # tokens / (train_rows * seq_len)
    duplicates_train_eval: int = 0  # eval examples whose exact content is also in train
    duplicates_train: int = 0  # train records that repeat an earlier train record exactly
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per source: path, weight, counts
    fingerprints: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def count_source(self, label: str, read: Any, fingerprint: dict[str, Any]) -> None:
        """Add one source's read (`ftjax.data.records.ReadResult`): its records, drops by reason, fingerprint."""
        self.records += read.total
        for reason, n in read.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        for reason, where in read.first_dropped.items():
            self.first_dropped.setdefault(reason, where)
        self.fingerprints[label] = fingerprint

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def check_dropped(self, max_fraction: float, what: str = "records") -> None:
        """DataError when more than `max_fraction` (data.max_dropped_fraction) of the records was dropped."""
        total = max(1, self.records)
        if self.dropped_total / total > max_fraction:
            reasons = ", ".join(f"{r}: {n} (first at {self.first_dropped.get(r, '?')})"
                                for r, n in sorted(self.dropped.items()))
            raise DataError(f"{self.dropped_total} of {self.records} {what} were dropped "
                            f"({100 * self.dropped_total / total:.1f}%), more than data.max_dropped_fraction="
                            f"{max_fraction}: {reasons}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the run record."""
        return {**dataclasses.asdict(self), "dropped_total": self.dropped_total}

    def format(self) -> str:
        """A few human-readable lines for the start of a run."""
        lines = [
            f"data: {self.records} records read, {self.dropped_total} dropped"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) + ")" if self.dropped else "")
            + (f", {self.truncated} truncated to seq_len" if self.truncated else ""),
            f"data: train {self.train_examples} examples in {self.train_rows} rows of {self.seq_len}, "
            f"{self.tokens} tokens ({self.trained_tokens} trained), packing efficiency "
            f"{100 * self.packing_efficiency:.1f}%",
            f"data: eval {self.eval_examples} examples in {self.eval_rows} rows; exact duplicates train/eval "
            f"{self.duplicates_train_eval}, within train {self.duplicates_train}",
        ]
        for s in self.sources:
            lines.append(f"data: source {s['path']} weight {s['weight']:g}: {s['records']} records, "
                         f"{s['examples']} examples used per pass")
        for path, fp in self.fingerprints.items():
            lines.append(f"data: {path} {fp['size']} bytes sha256 {fp['sha256'][:16]}")
        return "\n".join(lines)
