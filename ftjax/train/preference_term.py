"""The preference loss term of one micro-batch: policy (and reference) reply log-probs -> per-pair sums.

The step divides `sums["loss"]` by the global batch's pair count (`global_pairs`), as it divides the
cross-entropy sum by the global token weight, so micro-batches and shards combine into TRL's per-pair mean.
The reference is the same graph merged with other trainables: all-zero adapters for a fresh LoRA adapter (the
base, no second copy), the starting adapter when continuing one; ORPO and SimPO take none.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.train.preference import PreferenceConfig, ReplyLogps, pair_losses, pair_sums
from ftjax.train.reply_logps import model_pair_logps


def reference_pair_logps(graphdef: nnx.GraphDef, reference_trainable: Any, frozen: Any, batch: dict,
                         max_pairs: int, chunk: int) -> ReplyLogps:
    """Reply log-probs of the reference (no dropout, no gradient)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(reference_trainable), frozen)
    logps, _ = model_pair_logps(model, batch, max_pairs, chunk)
    return jax.tree.map(jax.lax.stop_gradient, logps)


def preference_sums(cfg: PreferenceConfig, model: nnx.Module, batch: dict, max_pairs: int, chunk: int = 512, *,
                    reference: ReplyLogps | None = None, rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """`pair_sums` of the configured objective on one micro-batch (`reference`: the reference's reply log-probs,
    from `reference_pair_logps` or a cache; needed for DPO / IPO)."""
    policy, valid = model_pair_logps(model, batch, max_pairs, chunk, rng=rng)
    return pair_sums(pair_losses(cfg, policy, reference), valid)


def global_pairs(batch: dict) -> jax.Array:
    """Pairs in a global batch (rows' chosen-reply starts); an empty batch counts 1 (zero loss, not 0/0)."""
    ids = batch["reply_ids"]
    chosen = (ids > 0) & (ids % 2 == 1)
    starts = chosen & jnp.concatenate([jnp.ones_like(chosen[:, :1]), ids[:, 1:] != ids[:, :-1]], axis=1)
    return jnp.maximum(jnp.sum(starts.astype(jnp.float32)), 1.0)
