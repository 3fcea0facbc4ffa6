"""Per-token KL divergence and NLL from logits, in fp32 or wider: the one definition the metrics and the regularizer share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    """At least fp32 (bf16 logits are upcast; fp64 stays fp64 for finite-difference checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def token_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) per position, p = softmax(logits_p) ([..., V] -> [...]).

    Computed from log-softmaxes (no 0·log 0 NaNs); not clamped, so its gradient stays exact near p = q.
    """
    logp = jax.nn.log_softmax(_f32(logits_p), axis=-1)
    logq = jax.nn.log_softmax(_f32(logits_q), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """−log softmax(logits)[target] per position ([..., V], [...] -> [...])."""
    logits = _f32(logits)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked
