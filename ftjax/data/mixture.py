"""Several training sources with mixture weights: `data.train="a.jsonl:0.7,b.jsonl:0.3"`.

Syntax: comma-separated entries `PATH` or `PATH:WEIGHT` (the weight is the text after the last colon
when it parses as a number; weights are relative and need not sum to 1; an entry without a weight
counts 1). Meaning: one pass over the mixture has as many examples as all sources together, and
source i fills the fraction w_i / sum(w) of it; a source smaller than its share is repeated, a larger
one subsampled, in a fixed order drawn from the seed. With one source every example is used once.
Replay (forget.replay_fraction, `replay_indices`) differs: every task example is kept and retain examples
are added, repeated as needed, to make up that fraction of the pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source: a JSONL/JSON file path and its relative weight."""

    path: str
    weight: float = 1.0


def parse_sources(spec: str) -> list[Source]:
    """`"a.jsonl:0.7,b.jsonl:0.3"` -> [Source("a.jsonl", 0.7), Source("b.jsonl", 0.3)]."""
    out = []
    for entry in (e.strip() for e in (spec or "").split(",")):
        if not entry:
            continue
        path, weight = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if not weight > 0 or not np.isfinite(weight):
            raise DataError(f"data.train: weight of '{path}' must be a positive number, got {tail!r}")
        out.append(Source(path, weight))
    if not out:
        raise DataError("data.train is empty: give a file (data.train=train.jsonl), several with weights "
                        "(data.train=a.jsonl:0.7,b.jsonl:0.3), or a TFDS dataset (data.tfds_name)")
    paths = [s.path for s in out]
    if len(set(paths)) != len(paths):
        raise DataError(f"data.train names a file twice: {spec}")
    return out


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Examples taken from each source in one pass over the mixture (sum = sum of sizes)."""
    total, w = sum(sizes), np.asarray(weights, np.float64)
    if len(sizes) == 1:
        return list(sizes)
    raw = total * w / w.sum()
    counts = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:  # largest remainders
        counts[k] += 1
    for size, count, src_w in zip(sizes, counts, weights):
        if count and not size:
            raise DataError(f"a training source with weight {src_w} has no usable examples")
    return counts.tolist()


def mixture_indices(sizes: list[int], weights: list[float], seed: int) -> list[np.ndarray]:
    """Per source, the example indices one pass over the mixture uses (repeating or subsampling)."""
    counts = mixture_counts(sizes, weights)
    if len(sizes) == 1:
        return [np.arange(sizes[0], dtype=np.int64)]
    out = []
    for k, (size, count) in enumerate(zip(sizes, counts)):
        perm = np.random.default_rng([seed, k, 0x6D6978]).permutation(size)
        reps = -(-count // size) if size else 0
        out.append(np.tile(perm, reps)[:count].astype(np.int64))
    return out


def replay_indices(n_task: int, n_replay: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of the replay examples that join a pass of `n_task` task examples (all kept) so that they
    make up `fraction` of it: round(fraction / (1 - fraction) · n_task) of them, repeated as needed."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"forget.replay_fraction must be in (0, 1), got {fraction}")
    if not n_replay:
        raise DataError("replay: the retain set has no usable examples to replay")
    count = max(1, int(round(fraction / (1.0 - fraction) * n_task)))
    perm = np.random.default_rng([seed, 0x7265706C]).permutation(n_replay)
    return np.tile(perm, -(-count // n_replay))[:count].astype(np.int64)
