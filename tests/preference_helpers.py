"""Preference batches from (prompt, chosen, rejected) token lists, as the data pipeline lays them out."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def pair_rows(pairs, seq_len: int, packed: bool) -> dict:
    """All pairs in one row (packed) or one pair a row. Each half is its own segment (prompt + reply) with
    positions from 0; reply targets (chosen in segment 2k+1, rejected in 2k+2) carry loss weight 1."""
    rows = [pairs] if packed else [[p] for p in pairs]
    keys = ("input_ids", "targets", "segment_ids", "positions")
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in keys}
    out["loss_weights"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        pos, seg = 0, 0
        for k, (prompt, chosen, rejected) in enumerate(row):
            for half, reply in enumerate((chosen, rejected)):
                ids = list(prompt) + list(reply)
                n = len(ids) - 1
                seg += 1
                sl = slice(pos, pos + n)
                out["input_ids"][r, sl], out["targets"][r, sl] = ids[:-1], ids[1:]
                out["segment_ids"][r, sl], out["positions"][r, sl] = seg, np.arange(n)
                out["loss_weights"][r, pos + len(prompt) - 1:pos + n] = 1.0
                pos += n
    return {k: jnp.asarray(v) for k, v in out.items()}


def write_pairs(folder, n_train: int = 16, n_eval: int = 8, seed: int = 0) -> tuple[str, str]:
    """(train.jsonl, eval.jsonl) of generated sums in TRL's standard preference format: the right sum is chosen,
    a wrong one rejected."""
    import json
    import random
    from pathlib import Path

    rng = random.Random(seed)
    paths = (Path(folder) / "pairs_train.jsonl", Path(folder) / "pairs_eval.jsonl")
    for path, n in zip(paths, (n_train, n_eval)):
        with open(path, "w") as f:
            for _ in range(n):
                a, b = rng.randint(1, 50), rng.randint(1, 50)
                wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 9)
                f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)}) + "\n")
    return str(paths[0]), str(paths[1])
