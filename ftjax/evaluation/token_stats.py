"""Teacher-forced per-token statistics of one model (and optionally its base) on fixed token sequences.

One jitted pass gives, per sequence, the summed NLL of the model, the summed NLL of the base and the summed
KL(base ‖ model) over the sequence's weighted positions, plus the weight. Logits are made only at the
weighted positions (the replies; prompts need hidden states, not logits), chunk by chunk, so only
[batch, chunk, vocab] fp32 logits per model exist at a time.

A sequence is `(ids, trained)` in the data pipeline's convention: position t predicts ids[t+1], counted
when trained[t+1] (so the reply tokens, the end-of-turn token included, are what is measured).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.evaluation.divergence import token_kl, token_nll
from ftjax.generate import bucket_length
from ftjax.logs import progress
from ftjax.placement import fetch, split_rows

Sequences = Sequence[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class TokenSums:
    """Per-sequence sums over weighted positions; `base_nll`/`kl` are None when no base model was given."""

    nll: np.ndarray  # [n] float64
    tokens: np.ndarray  # [n] float64, the weight (number of measured tokens)
    base_nll: np.ndarray | None = None
    kl: np.ndarray | None = None

    @staticmethod
    def mean(sums: np.ndarray | None, tokens: np.ndarray) -> float | None:
        """Token-weighted mean over all sequences pooled (None when there is nothing to average)."""
        if sums is None:
            return None
        return float(np.sum(sums) / max(float(np.sum(tokens)), 1.0))


def _chunked(h_btd, hb_btd, logits_fn, base_logits_fn, targets, weights, chunk):
    """Per-row (nll, base nll, kl) sums, scanning over length chunks of `chunk` positions."""
    b, t, d = h_btd.shape
    n = t // chunk  # t is a bucket length, a multiple of chunk

    def split(x):
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    xs = (split(h_btd), None if hb_btd is None else split(hb_btd), split(targets), split(weights))

    def body(carry, x):
        h, hb, tg, w = x
        logits = logits_fn(h)
        nll = jnp.sum(jnp.where(w != 0, token_nll(logits, tg) * w, 0.0), axis=-1)
        if hb is None:
            return (carry[0] + nll, carry[1], carry[2]), None
        base_logits = base_logits_fn(hb)
        base_nll = jnp.sum(jnp.where(w != 0, token_nll(base_logits, tg) * w, 0.0), axis=-1)
        kl = jnp.sum(jnp.where(w != 0, token_kl(base_logits, logits) * w, 0.0), axis=-1)
        return (carry[0] + nll, carry[1] + base_nll, carry[2] + kl), None

    zeros = jnp.zeros((b,), jnp.float32)
    (nll, base_nll, kl), _ = jax.lax.scan(body, (zeros, zeros, zeros), xs)
    return nll, base_nll, kl


@functools.partial(jax.jit, static_argnames=("graphdef", "base_graphdef", "chunk"))
def _sums(graphdef, state, base_graphdef, base_state, input_ids, segment_ids, positions, measured, targets, weights,
          *, chunk: int):
    """`measured` [b, k]: the positions whose logits count; `targets` / `weights` are given at those positions."""
    model = nnx.merge(graphdef, state)
    at = lambda h: jnp.take_along_axis(h, measured[..., None], axis=1)
    h = at(model.hidden(input_ids, positions, segment_ids))
    base_logits_fn, hb = None, None
    if base_graphdef is not None:
        base = nnx.merge(base_graphdef, base_state)
        hb, base_logits_fn = at(base.hidden(input_ids, positions, segment_ids)), base.logits
    return _chunked(h, hb, model.logits, base_logits_fn, targets, weights, chunk)


def _measured(batch: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted positions of each row, left-aligned in [rows, k] (padding: position 0, weight 0), with
    their targets and weights."""
    weights = batch["weights"]
    counts = (weights != 0).sum(axis=1)
    measured = np.zeros((weights.shape[0], k), np.int32)
    for j, row in enumerate(weights):
        where = np.flatnonzero(row)
        measured[j, :len(where)] = where
    valid = np.arange(k)[None, :] < counts[:, None]
    take = lambda x: np.where(valid, np.take_along_axis(x, measured, axis=1), 0).astype(x.dtype)
    return measured, take(batch["targets"]), take(weights)


def padded_length(n: int, chunk: int) -> int:
    """`n` rounded up to a multiple of `chunk` (a power of two from 16 below it): one length serves a whole
    call, and padding wastes less than a chunk a row (a power-of-two bucket wastes up to half of it)."""
    return -(-n // chunk) * chunk if n > chunk else bucket_length(n)


def even_batches(order: Sequence[int], max_batch: int) -> list[list[int]]:
    """`order` in the fewest batches of at most `max_batch` rows, equal sizes but a possibly shorter last one
    (callers pad it to the first's size, so one shape serves all with as few padding rows as possible)."""
    n = len(order)
    if n == 0:
        return []
    count = -(-n // max(1, max_batch))
    size = -(-n // count)
    return [list(order[lo:lo + size]) for lo in range(0, n, size)]


def _batch(seqs: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, length: int) -> dict[str, np.ndarray]:
    """Right-padded rows (segment 0 on padding); missing rows are all padding with zero weight."""
    out = {k: np.zeros((rows, length), np.float32 if k == "weights" else np.int32)
           for k in ("input_ids", "targets", "weights", "segment_ids", "positions")}
    for j, (ids, trained) in enumerate(seqs):
        n = len(ids) - 1
        out["input_ids"][j, :n], out["targets"][j, :n] = ids[:-1], ids[1:]
        out["weights"][j, :n] = np.asarray(trained[1:], np.float32)
        out["segment_ids"][j, :n] = 1
        out["positions"][j, :n] = np.arange(n)
    return out


def teacher_forced(model: nnx.Module, sequences: Sequences, *, base: nnx.Module | None = None,
                   batch_size: int = 16, chunk: int = 64) -> TokenSums:
    """Per-sequence NLL sums of `model` (and the base's NLL and KL(base ‖ model) when `base` is given).

    Sequences are sorted by length and split into equal batches of at most `batch_size` (the last padded
    with empty rows), all padded to one length (`padded_length` of the longest), so a whole eval compiles once.
    """
    n = len(sequences)
    if any(len(ids) < 2 for ids, _ in sequences):
        raise ValueError("every sequence needs at least two tokens (a context and a target)")
    graphdef, state = nnx.split(model)
    base_graphdef, base_state = nnx.split(base) if base is not None else (None, None)
    out = {k: np.zeros(n, np.float64) for k in ("nll", "base_nll", "kl", "tokens")}
    order = sorted(range(n), key=lambda i: len(sequences[i][0]))
    batches = even_batches(order, batch_size)
    # one shape for the whole call (as the train step's fixed rows): the longest sequence's length and the most
    # measured positions, each rounded up, so scoring compiles once, not once per length bucket
    length = padded_length(max((len(ids) - 1 for ids, _ in sequences), default=1), chunk)
    k = padded_length(max((int(np.count_nonzero(t[1:])) for _, t in sequences), default=1), chunk)
    c = min(chunk, k)
    with split_rows(state) as split, progress(n, "seq", "  scoring") as bar:  # minutes for hundreds on a CPU
        rows = split.rows(len(batches[0])) if batches else 0  # padding rows weigh 0
        for idx in batches:
            b = _batch([sequences[i] for i in idx], rows, length)
            measured, targets, weights = _measured(b, k)
            placed = split.put(b["input_ids"], b["segment_ids"], b["positions"], measured, targets, weights)
            nll, base_nll, kl = map(fetch, _sums(graphdef, state, base_graphdef, base_state, *placed, chunk=c))
            m = len(idx)
            out["nll"][idx], out["base_nll"][idx], out["kl"][idx] = nll[:m], base_nll[:m], kl[:m]
            out["tokens"][idx] = b["weights"][:m].sum(axis=1)
            bar.update(m)
    has_base = base is not None
    return TokenSums(out["nll"], out["tokens"], out["base_nll"] if has_base else None, out["kl"] if has_base else None)
