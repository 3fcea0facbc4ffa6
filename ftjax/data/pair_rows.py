"""Rows of whole preference pairs: both halves of a pair always in the same row, never split.

Pair k of a row (from 0) puts its chosen half in segment 2k+1 and its rejected half in segment 2k+2, each with
positions from 0, so attention never crosses halves and a packed pair gives the log-probs it gives alone. A
batch holds exactly the train step's keys (an SFT batch's arrays, nothing more): `loss_weights` mark the trained
reply tokens of both halves, so a position's reply is its segment id where its weight is > 0
(`ftjax.objectives.reply_logps.reply_ids`), odd for a chosen reply, even for a rejected one; the cross-entropy on the
chosen reply (ORPO's NLL, `pref.sft_weight`) keeps the odd segments' weights. Pairs are packed best-fit
decreasing on their positions, as `ftjax.data.packing` packs examples.

With `reference` (per pair: the reference model's summed log-prob of the chosen and the rejected reply, computed
once before full fine-tuning), batches also carry `ref_logps` (float32 [B, T]): each reply's reference log-prob
at its first reply position, 0 elsewhere, so summing it by reply gives the reference per reply.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.data.packing import BATCH_KEYS, group_rows
from ftjax.data.preference import PairExamples



@dataclasses.dataclass
class PairRows:
    """Row r holds pairs `items[offsets[r]:offsets[r+1]]`; duck-types `data.packing.PackedRows` for the loaders."""

    pairs: PairExamples
    seq_len: int
    offsets: np.ndarray  # int64 [R+1]
    items: np.ndarray  # int64 [sum]
    reference: np.ndarray | None = None  # float32 [pairs, 2]: reference log-probs (chosen, rejected) per pair

    def with_reference(self, reference: np.ndarray) -> "PairRows":
        """The same rows whose batches carry `ref_logps` from `reference` [pairs, 2]."""
        reference = np.asarray(reference, np.float32)
        if reference.shape != (len(self.pairs), 2):
            raise ValueError(f"reference log-probs must be [{len(self.pairs)}, 2], got {reference.shape}")
        return dataclasses.replace(self, reference=reference)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_items(self, r: int) -> np.ndarray:
        return self.items[self.offsets[r]:self.offsets[r + 1]]

    @property
    def max_pairs(self) -> int:
        """Most pairs in any row: the static pair slots per row the loss needs (`max_pairs`)."""
        return int(np.max(np.diff(self.offsets))) if len(self) else 1

    def batch(self, rows: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The rows as a preference batch; a row index < 0 gives an all-padding row."""
        b, t = len(rows), self.seq_len
        keys = BATCH_KEYS + (("ref_logps",) if self.reference is not None else ())
        out = {k: np.zeros((b, t), np.float32 if k in ("loss_weights", "ref_logps") else np.int32) for k in keys}
        ar = np.arange(t, dtype=np.int32)
        for j, r in enumerate(rows):
            if r < 0:
                continue
            pos, seg = 0, 0
            for p in self.row_items(int(r)):
                for half, ex in enumerate((self.pairs.chosen, self.pairs.rejected)):
                    seg += 1
                    s, n = int(ex.starts[p]), int(ex.lengths[p]) - 1
                    trained = ex.trained[s + 1:s + n + 1]
                    out["input_ids"][j, pos:pos + n] = ex.ids[s:s + n]
                    out["targets"][j, pos:pos + n] = ex.ids[s + 1:s + n + 1]
                    out["segment_ids"][j, pos:pos + n] = seg
                    out["positions"][j, pos:pos + n] = ar[:n]
                    out["loss_weights"][j, pos:pos + n] = trained
                    if self.reference is not None and trained.any():
                        out["ref_logps"][j, pos + int(np.argmax(trained))] = self.reference[p, half]
                    pos += n
        return out

    def positions_used(self) -> int:
        return int(np.sum(self.pairs.positions()[self.items]))

    def efficiency(self) -> float:
        return self.positions_used() / max(1, len(self) * self.seq_len)


def make_pair_rows(pairs: PairExamples, seq_len: int, packing: bool, order: np.ndarray | None = None,
                   max_segments: int = 0) -> PairRows:
    """Rows of whole pairs (each ≤ seq_len positions, see `fit_pairs`); `packing=False` puts one pair a row;
    packed rows hold at most `max_segments` halves (0: no bound)."""
    positions = pairs.positions()
    if positions.size and positions.max() > seq_len:
        raise ValueError("every pair must fit one row (fit_pairs) before it is packed")
    return PairRows(pairs, seq_len, *group_rows(positions, seq_len, packing, order, max_segments // 2))
