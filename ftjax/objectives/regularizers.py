"""Loss terms that hold a fine-tuned model near its base (forgetting control); ftjax/objectives/terms.py composes them.

    loss = CE_mean + forget.kl_weight · KL_mean(retain batch) + forget.l2_weight · l2_to_base(trainable, base)

- KL-to-base: KL(p_base ‖ p_tuned) per position, token-weighted over the retain batch's reply tokens;
  the base side is a constant (stop_gradient). For LoRA the base is the same model with all-zero
  adapters (`adapters_zeroed`): exactly the base, with no second copy of the frozen weights. For full
  fine-tuning it is the weights at step 0 (`start_copy`, a copy the loop keeps).
- L2-to-base: Σ ‖W − W_base‖² over every trainable array (fp32 sums, no ½), for full fine-tuning.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ftjax.evaluation.divergence import token_kl
from ftjax.objectives.loss import length_chunks


def kl_to_base_sums(logits_tuned: jax.Array, logits_base: jax.Array, weights: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(Σ w·KL(base ‖ tuned), Σ w) over positions [B, T] from logits [B, T, V]; sums combine over micro-batches."""
    kl = token_kl(jax.lax.stop_gradient(logits_base), logits_tuned)
    w = weights.astype(kl.dtype)
    return jnp.sum(jnp.where(w != 0, kl * w, 0.0)), jnp.sum(w)


def kl_to_base_loss(logits_tuned: jax.Array, logits_base: jax.Array, weights: jax.Array) -> jax.Array:
    """Token-weighted mean KL(base ‖ tuned); 0 at the base, and its gradient there is 0 too."""
    total, weight = kl_to_base_sums(logits_tuned, logits_base, weights)
    return total / jnp.maximum(weight, 1e-9)


def chunked_kl_to_base(logits_fn: Callable[[jax.Array], jax.Array], h_btd: jax.Array,
                       base_logits_fn: Callable[[jax.Array], jax.Array], base_h_btd: jax.Array,
                       weights_bt: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`kl_to_base_sums` from hidden states, one length chunk of logits at a time (rematerialized in the
    backward pass), like `chunked_cross_entropy`: memory [B, chunk, V] per model instead of [B, T, V]."""
    base_h_btd = jax.lax.stop_gradient(base_h_btd)

    @jax.checkpoint
    def one_chunk(h, hb, w):
        return kl_to_base_sums(logits_fn(h), base_logits_fn(hb), w)[0]

    def body(total, xs):
        return total + one_chunk(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), length_chunks(chunk, h_btd, base_h_btd, weights_bt))
    return total, jnp.sum(weights_bt.astype(jnp.float32))


def l2_to_base(trainable: Any, base_trainable: Any) -> jax.Array:
    """Σ ‖W − W_base‖² over the float leaves of two same-structured trees (base held constant)."""
    base_trainable = jax.lax.stop_gradient(base_trainable)
    sq = jax.tree.map(lambda w, w0: jnp.sum(jnp.square(w.astype(jnp.float32) - w0.astype(jnp.float32))),
                      trainable, base_trainable)
    return sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32))


def adapters_zeroed(trainable: Any) -> Any:
    """LoRA trainables with the adapters zeroed (x·A·B = 0 exactly: the pre-trained model), made inside the step,
    never stored."""
    return jax.tree.map(jnp.zeros_like, trainable)
