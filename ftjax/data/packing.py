"""Rows of `seq_len` positions built from examples: several per row (packed) or one per row (padded).

An example of n tokens fills n-1 positions (inputs t0..t(n-2), targets t1..t(n-1)). Packing is
best-fit decreasing on lengths, computed once (ties broken by a seeded order); the loader then shuffles
whole rows each epoch. Each example gets its own `segment_ids` value and `positions` from 0, so
attention never crosses examples.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from ftjax.data.examples import Examples

BATCH_KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
PAIR_KEYS = ("ref_logps",)  # what a full-FT preference batch adds (ftjax/data/pair_rows.py), carried when present
ROLLOUT_KEYS = ("advantages", "old_logps")  # what a rollout batch adds (ftjax/objectives/rollout_rows.py), when present


def best_fit_rows(positions: np.ndarray, seq_len: int, order: np.ndarray | None = None, max_items: int = 0
                  ) -> list[list[int]]:
    """Group items (each `positions[i]` ≤ seq_len) into rows of total ≤ seq_len, best-fit decreasing; with
    `max_items` > 0 a row that holds that many items takes no more."""
    order = np.arange(len(positions)) if order is None else np.asarray(order)
    order = order[np.argsort(-positions[order], kind="stable")]
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free capacities that some open row has
    rows_by_free: dict[int, list[int]] = {}
    for i in order.tolist():
        need = int(positions[i])
        k = bisect.bisect_left(free_sizes, need)
        if k < len(free_sizes):
            free = free_sizes[k]
            r = rows_by_free[free].pop()
            if not rows_by_free[free]:
                del rows_by_free[free], free_sizes[k]
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        left = free - need
        if left > 0 and not (max_items and len(rows[r]) >= max_items):
            if left not in rows_by_free:
                rows_by_free[left] = []
                bisect.insort(free_sizes, left)
            rows_by_free[left].append(r)
    return rows


@dataclasses.dataclass
class PackedRows:
    """Rows of packed examples: row r holds examples `items[offsets[r]:offsets[r+1]]`, in that order."""

    examples: Examples
    seq_len: int
    offsets: np.ndarray  # int64 [R+1]
    items: np.ndarray  # int64 [sum]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_items(self, r: int) -> np.ndarray:
        return self.items[self.offsets[r]:self.offsets[r + 1]]

    def batch(self, rows: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The rows as a batch in the train-step contract; a row index < 0 gives an all-padding row."""
        b, t, ex = len(rows), self.seq_len, self.examples
        out = {k: np.zeros((b, t), np.float32 if k == "loss_weights" else np.int32) for k in BATCH_KEYS}
        ar = np.arange(t, dtype=np.int32)
        for j, r in enumerate(rows):
            if r < 0:
                continue
            pos = 0
            for seg, e in enumerate(self.row_items(int(r)), 1):
                s, n = int(ex.starts[e]), int(ex.lengths[e]) - 1
                out["input_ids"][j, pos:pos + n] = ex.ids[s:s + n]
                out["targets"][j, pos:pos + n] = ex.ids[s + 1:s + n + 1]
                out["loss_weights"][j, pos:pos + n] = ex.trained[s + 1:s + n + 1]
                out["segment_ids"][j, pos:pos + n] = seg
                out["positions"][j, pos:pos + n] = ar[:n]
                pos += n
        return out

    def positions_used(self) -> int:
        """Non-padding positions over all rows."""
        return int(np.sum(self.examples.lengths[self.items] - 1))

    def efficiency(self) -> float:
        """Packing efficiency: the non-padding fraction of all row positions."""
        return self.positions_used() / max(1, len(self) * self.seq_len)


def make_rows(examples: Examples, seq_len: int, packing: bool, order: np.ndarray | None = None,
              max_segments: int = 0) -> PackedRows:
    """Rows from examples that each fit (≤ seq_len+1 tokens); `order` breaks packing ties / orders unpacked rows;
    packed rows hold at most `max_segments` examples (0: no bound)."""
    positions = examples.lengths - 1
    if positions.size and (positions.max() > seq_len or positions.min() < 1):
        raise ValueError("every example must have 2..seq_len+1 tokens before it is packed")
    return PackedRows(examples, seq_len, *group_rows(positions, seq_len, packing, order, max_segments))


def group_rows(positions: np.ndarray, seq_len: int, packing: bool, order: np.ndarray | None = None,
               max_items: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [R+1], items): items of `positions` each ≤ seq_len, best-fit packed (at most `max_items` a row,
    0: no bound) or one a row (in `order`)."""
    if packing:
        groups = best_fit_rows(positions, seq_len, order, max_items)
    else:
        groups = [[i] for i in (range(len(positions)) if order is None else np.asarray(order).tolist())]
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
    return offsets, np.array([i for g in groups for i in g], np.int64)
