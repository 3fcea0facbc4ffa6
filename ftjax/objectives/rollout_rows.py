"""Rollouts as training rows: each prompt + its sampled completion one segment, packed best-fit like SFT rows, in
the train step's batch contract plus what the GRPO loss reads per position (`advantages`, and `old_logps` /
`ref_logps` when given). Only the completion's tokens are targets with loss weight 1: the prompt is masked out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ftjax.data.packing import BATCH_KEYS, group_rows


def pack_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], advantages,
                  seq_len: int, rows: int | None = None, per_token: dict[str, Sequence] | None = None
                  ) -> dict[str, np.ndarray]:
    """[rows, seq_len] arrays: BATCH_KEYS, `advantages` (each completion's, on its target positions) and each
    `per_token` field (one value per completion token, e.g. the sampling-time log-probs) at the position that
    predicts that token. `rows`: pad with empty rows to this many (None: as many as needed)."""
    lengths = np.array([len(p) + len(c) - 1 for p, c in zip(prompts, completions, strict=True)], np.int64)
    if lengths.size and (lengths.max() > seq_len or min(len(c) for c in completions) < 1
                         or min(len(p) for p in prompts) < 1):
        raise ValueError(f"each rollout needs a prompt, a completion and ≤ {seq_len + 1} tokens in all "
                         f"(the longest has {int(lengths.max()) + 1})")
    offsets, items = group_rows(lengths, seq_len, packing=True)
    need = len(offsets) - 1
    rows = need if rows is None else rows
    if need > rows:
        raise ValueError(f"{len(prompts)} rollouts need {need} rows of {seq_len}; the batch has {rows}")
    per_token = per_token or {}
    out = {k: np.zeros((rows, seq_len), np.float32 if k == "loss_weights" else np.int32) for k in BATCH_KEYS}
    out.update({k: np.zeros((rows, seq_len), np.float32) for k in ("advantages", *per_token)})
    advantages = np.asarray(advantages, np.float32)
    for r in range(need):
        pos = 0
        for seg, i in enumerate(items[offsets[r]:offsets[r + 1]], 1):
            tokens = np.concatenate([np.asarray(prompts[i], np.int32), np.asarray(completions[i], np.int32)])
            n, first = len(tokens) - 1, pos + len(prompts[i]) - 1  # `first` predicts the completion's first token
            out["input_ids"][r, pos:pos + n] = tokens[:-1]
            out["targets"][r, pos:pos + n] = tokens[1:]
            out["segment_ids"][r, pos:pos + n] = seg
            out["positions"][r, pos:pos + n] = np.arange(n)
            out["loss_weights"][r, first:pos + n] = 1.0
            out["advantages"][r, first:pos + n] = advantages[i]
            for k, values in per_token.items():
                out[k][r, first:pos + n] = values[i]
            pos += n
    return out
