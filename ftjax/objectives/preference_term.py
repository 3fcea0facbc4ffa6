"""The preference loss term of one micro-batch: policy (and reference) reply log-probs -> per-pair sums.

The step divides `sums["loss"]` by the global batch's pair count (`global_pairs`), as it divides the
cross-entropy sum by the global token weight, so micro-batches and shards combine into TRL's per-pair mean.
The reference is the same graph merged with other trainables: all-zero adapters for a fresh LoRA adapter (the
base, no second copy), the starting adapter when continuing one; under full fine-tuning, log-probs computed once
before training (`pair_reference_logps`) and carried by the batch as `ref_logps` (`batch_reference`).
ORPO and SimPO take none.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.data.pair_rows import PairRows
from ftjax.logs import progress
from ftjax.objectives.pair_losses import (LENGTH_NORMALIZED, PreferenceConfig, ReplyLogps, pair_losses, pair_sums,
                                    preference_accuracy)
from ftjax.objectives.reply_logps import head_pair_logps, model_pair_logps, pair_logps, reply_ids


def reference_pair_logps(graphdef: nnx.GraphDef, reference_trainable: Any, frozen: Any, batch: dict,
                         max_pairs: int, chunk: int) -> ReplyLogps:
    """Reply log-probs of the reference (no dropout, no gradient)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(reference_trainable), frozen)
    logps, _ = model_pair_logps(model, batch, max_pairs, chunk)
    return jax.tree.map(jax.lax.stop_gradient, logps)


def max_pairs_of(seq_len: int) -> int:
    """Pair slots per row the step reserves: a row of `seq_len` positions holds at most this many pairs (each
    half takes at least one position), so the static bound needs no look at the data."""
    return max(1, (int(seq_len) + 1) // 2)


def forward_sums(cfg: PreferenceConfig, forward: Any, max_pairs: int, chunk: int, reference: str | None
                 ) -> dict[str, jax.Array]:
    """`pair_sums` from the train step's pass (`ftjax.objectives.terms.Forward`): policy log-probs from its hidden
    states; the reference from the reference pass (`reference="pass"`), the batch's cached `ref_logps` ("cache"),
    or none (ORPO, SimPO)."""
    policy, valid = head_pair_logps(forward.model, forward.hidden, forward.batch, max_pairs, chunk)
    ref = None
    if reference == "pass":
        r = forward.reference
        ref = jax.tree.map(jax.lax.stop_gradient, head_pair_logps(
            r.model, jax.lax.stop_gradient(r.hidden), forward.batch, max_pairs, chunk)[0])
    elif reference == "cache":
        ref = batch_reference(forward.batch, max_pairs)
    return pair_sums(pair_losses(cfg, policy, ref), valid)


def preference_sums(cfg: PreferenceConfig, model: nnx.Module, batch: dict, max_pairs: int, chunk: int = 512, *,
                    reference: ReplyLogps | None = None, rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """`pair_sums` of the configured objective on one micro-batch (`reference`: the reference's reply log-probs,
    from `reference_pair_logps` or a cache; needed for DPO / IPO)."""
    policy, valid = model_pair_logps(model, batch, max_pairs, chunk, rng=rng)
    return pair_sums(pair_losses(cfg, policy, reference), valid)


def global_pairs(batch: dict) -> jax.Array:
    """Pairs in a global batch (rows' chosen-reply starts); an empty batch counts 1 (zero loss, not 0/0)."""
    ids = reply_ids(batch)
    chosen = (ids > 0) & (ids % 2 == 1)
    starts = chosen & jnp.concatenate([jnp.ones_like(chosen[:, :1]), ids[:, 1:] != ids[:, :-1]], axis=1)
    return jnp.maximum(jnp.sum(starts.astype(jnp.float32)), 1.0)


def batch_reference(batch: dict, max_pairs: int) -> ReplyLogps:
    """The reference log-probs a batch carries (`ref_logps`, from `PairRows.with_reference`)."""
    logps, _ = pair_logps(batch["ref_logps"], reply_ids(batch), max_pairs)
    return jax.tree.map(jax.lax.stop_gradient, logps)


@functools.lru_cache(maxsize=8)
def _pass_fn(graphdef: nnx.GraphDef, max_pairs: int, chunk: int):
    """The jitted pass of one model structure (compiled once per structure and batch shape, not per call)."""

    @jax.jit
    def run(state, batch):
        logps, _ = model_pair_logps(nnx.merge(graphdef, state), batch, max_pairs, chunk)
        return jnp.stack(list(logps), axis=-1)

    return run


def pass_pair_logps(model: nnx.Module, rows: PairRows, batch_size: int, chunk: int = 512) -> ReplyLogps:
    """One pass of `model` (no dropout) over every row: per pair, indexed as `rows.pairs`, the summed log-probs
    and token counts of the chosen and the rejected reply (numpy [pairs] each)."""
    graphdef, state = nnx.split(model)
    max_pairs = rows.max_pairs
    run = _pass_fn(graphdef, max_pairs, chunk)
    out = np.zeros((len(rows.pairs), 4), np.float32)
    with progress(len(rows.pairs), "pair", "scoring preference pairs") as bar:  # minutes on a CPU: a clock
        for lo in range(0, len(rows), batch_size):
            ids = np.arange(lo, lo + batch_size)
            batch = rows.batch(np.where(ids < len(rows), ids, -1))  # a fixed shape: one compile
            got = np.asarray(run(state, {k: jnp.asarray(v) for k, v in batch.items()}))
            got = got.reshape(batch_size, max_pairs, 4)
            for j, r in enumerate(ids[ids < len(rows)]):
                items = rows.row_items(int(r))
                out[items] = got[j, :len(items)]
                bar.update(len(items))
    return ReplyLogps(*out.T)


def pair_reference_logps(model: nnx.Module, rows: PairRows, batch_size: int, chunk: int = 512) -> np.ndarray:
    """[pairs, 2] summed log-probs (chosen, rejected) of `model` (the reference), indexed as `rows.pairs`, for
    `rows.with_reference` (full fine-tuning: computed once, then cached)."""
    logps = pass_pair_logps(model, rows, batch_size, chunk)
    return np.stack([logps.chosen, logps.rejected], axis=-1)


def held_out_accuracy(cfg: PreferenceConfig, model: nnx.Module, rows: PairRows, batch_size: int,
                      chunk: int = 512) -> dict[str, float]:
    """Preference accuracy on held-out pairs (`preference_accuracy`: the share whose chosen reply has the higher
    log-prob, length-normalized for IPO / SimPO / ORPO), and the mean margin it compares."""
    logps = pass_pair_logps(model, rows, batch_size, chunk)
    chosen, rejected = logps.averaged() if cfg.objective in LENGTH_NORMALIZED else (logps.chosen, logps.rejected)
    return {"accuracy": float(np.mean(preference_accuracy(cfg, logps))),
            "margin": float(np.mean(np.asarray(chosen) - np.asarray(rejected))), "pairs": len(rows.pairs)}
