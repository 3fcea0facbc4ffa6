"""Per-token KL divergence and NLL from logits, in fp32: the one definition the metrics and the regularizer share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) per position, p = softmax(logits_p) ([..., V] -> [...]).

    Computed from log-softmaxes (no 0·log 0 NaNs); not clamped, so its gradient stays exact near p = q.
    """
    logp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """−log softmax(logits)[target] per position ([..., V], [...] -> [...])."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked
