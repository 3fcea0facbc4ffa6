"""Token-weighted cross-entropy computed chunk by chunk over the sequence.

Only one chunk's fp32 logits [B, chunk, V] exist at a time, forward and backward: each chunk's
logits are rematerialized in the backward pass (`jax.checkpoint`) instead of being kept.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, in fp32."""
    logits = logits_btv.astype(jnp.float32)
    idx = targets_bt[..., None].astype(jnp.int32)
    picked = jnp.take_along_axis(logits, idx, axis=-1, mode="clip")[..., 0]  # ignored targets may be -100
    return jax.nn.logsumexp(logits, axis=-1) - picked


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], h_btd: jax.Array, targets_bt: jax.Array,
                          weights_bt: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of weight · CE, sum of weight) over all tokens, from hidden states and a logits head.

    Sums, not a mean, so micro-batches combine into one token-weighted mean over the whole batch.
    """
    b, t, d = h_btd.shape
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
    weights_bt = weights_bt.astype(jnp.float32)
    h_nbcd = h_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_nbc = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
    weights_nbc = weights_bt.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_bcd, targets_bc, weights_bc):
        ce = token_cross_entropy(logits_fn(h_bcd), targets_bc)
        return jnp.sum(jnp.where(weights_bc != 0, ce * weights_bc, 0.0))  # NaN weights still propagate

    def body(total, xs):
        return total + one_chunk(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_nbcd, targets_nbc, weights_nbc))
    return total, jnp.sum(weights_bt)
