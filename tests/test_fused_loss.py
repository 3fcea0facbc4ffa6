"""The fused linear cross-entropy (head matmuls and softmax gradient in one forward pass) against plain
autodiff of the unchunked loss, and its memory/work promises: no [B, T, V] array, no head gradient
when the head is frozen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.objectives.loss import fused_cross_entropy, token_cross_entropy

RTOL = 1e-5
B, T, D, V = 3, 10, 8, 50


@pytest.fixture(scope="module")
def data():
    kh, kw, kt, kwt = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(kh, (B, T, D))
    w_vd = jax.random.normal(kw, (V, D))
    targets = jax.random.randint(kt, (B, T), 0, V).at[0, 3].set(-100)  # an ignored target...
    weights = jax.random.uniform(kwt, (B, T), minval=0.5, maxval=1.5).at[0, 3].set(0.0)  # ...with weight 0
    return h, w_vd, targets, weights


def reference(h, w, targets, weights, vocab_major):
    logits = h @ (w.T if vocab_major else w)
    ce = token_cross_entropy(logits, targets)
    return jnp.sum(jnp.where(weights != 0, ce * weights, 0.0))


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk", [4, 5, 10, 64])  # even, ragged, one chunk, longer than T
def test_loss_and_gradients_match_autodiff(data, vocab_major, chunk):
    h, w_vd, targets, weights = data
    w = w_vd if vocab_major else w_vd.T
    want, want_g = jax.value_and_grad(reference, argnums=(0, 1))(h, w, targets, weights, vocab_major)

    def fused(h, w):
        total, weight_sum = fused_cross_entropy(h, w, targets, weights, chunk, vocab_major=vocab_major)
        return total

    got, got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for g, r in zip(got_g, want_g):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fused)(h, w), want, rtol=RTOL)  # the plain (undifferentiated) path
    _, weight_sum = fused_cross_entropy(h, w, targets, weights, chunk, vocab_major=vocab_major)
    np.testing.assert_allclose(weight_sum, jnp.sum(weights), rtol=RTOL)


def _shapes(jaxpr) -> list[tuple]:
    """Output shapes of every equation, nested jaxprs (scans, calls, custom rules) included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += _shapes(sub)
    return out


def test_no_full_logits_and_no_head_gradient_for_a_frozen_head(data):
    h, w, targets, weights = data
    loss = lambda h, w: fused_cross_entropy(h, w, targets, weights, 4, vocab_major=True)[0]  # noqa: E731
    frozen = _shapes(jax.make_jaxpr(jax.grad(loss, argnums=0))(h, w).jaxpr)
    trained = _shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w).jaxpr)
    largest = max(int(np.prod(s)) for s in frozen + trained if s and s[-1] == V)
    assert largest <= B * 4 * V  # one chunk of logits at most, never [B, T, V]
    assert (V, D) not in frozen  # the head's weight gradient is not computed when nothing asks for it
    assert (V, D) in trained


def test_nan_weight_propagates(data):
    """A NaN loss weight must surface as a NaN loss (the step's guard then skips the update)."""
    h, w, targets, weights = data
    total, _ = fused_cross_entropy(h, w, targets, weights.at[1, 1].set(jnp.nan), 4, vocab_major=True)
    assert np.isnan(total)
