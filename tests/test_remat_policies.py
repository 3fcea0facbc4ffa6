"""Every remat policy gives the same loss and gradients as saving everything (recomputation changes
memory and time, never the math), for LoRA and full fine-tuning, with packed rows and a causal
sequence long enough for the attention's causal block skipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.lora import apply_lora
from ftjax.models.attention import causal_blocks
from ftjax.models.llama import REMAT_POLICIES, Llama
from ftjax.objectives.loss import fused_cross_entropy
from train_helpers import TINY, make_batch

RTOL = 1e-5
LENGTH = 256  # four causal blocks of 64


def loss_and_grads(remat: str, method: str, batch: dict):
    model = Llama(TINY.replace(remat=remat, max_position_embeddings=LENGTH), rngs=nnx.Rngs(0))
    if method == "lora":
        apply_lora(model, 4, 8.0, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam if method == "lora" else nnx.Param, ...)

    def loss(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        h = m.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"])
        w, vocab_major = m.head_weight()
        total, weight = fused_cross_entropy(h, w, batch["targets"], batch["loss_weights"], 64,
                                            vocab_major=vocab_major)
        return total / weight

    return jax.jit(jax.value_and_grad(loss))(trainable)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_remat_policies_match_no_remat(method):
    assert causal_blocks(LENGTH) == 4
    batch = make_batch(2, LENGTH)
    want, want_g = loss_and_grads("none", method, batch)
    for remat in REMAT_POLICIES:
        if remat == "none":
            continue
        got, got_g = loss_and_grads(remat, method, batch)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=remat)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7, err_msg=remat), got_g, want_g)


def test_causal_blocks_match_one_block():
    """Skipping key blocks after each query block gives the full masked attention's output."""
    from ftjax.models.attention import Rows
    from ftjax.models.layers import Attention, AttentionConfig

    cfg = AttentionConfig(32, 4, 2, 8)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    b, t = 2, LENGTH
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, 4, 8))
    k, v = jax.random.normal(kk, (b, t, 2, 8)), jax.random.normal(kv, (b, t, 2, 8))
    seg = jnp.asarray(make_batch(b, t)["segment_ids"])
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    # training rows (block skipping) against the same rows given with explicit slots (one masked block)
    np.testing.assert_allclose(attn.attend(q, k, v, Rows(seg, seg)), attn.attend(q, k, v, Rows(seg, seg, slots, slots)),
                               rtol=RTOL, atol=1e-6)
