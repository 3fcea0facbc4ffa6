"""Forgetting control terms: KL-to-base is 0 at the base with a 0 gradient, its value and gradient match numpy
and finite differences, the chunked form matches the plain one on a model, L2-to-base, and the KL term
lowers the measured KL of a short LoRA run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ftjax.evaluation.token_stats import TokenSums, teacher_forced
from ftjax.lora import apply_lora
from ftjax.objectives.loss import chunked_cross_entropy
from ftjax.objectives.regularizers import chunked_kl_to_base, kl_to_base_loss, l2_to_base, adapters_zeroed
from ftjax.train.state import split
from train_helpers import make_batch, tiny_model

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


def random_logits(seed, shape=(2, 5, 11), scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def weights(seed, shape=(2, 5)):
    w = np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)
    w[0, :2] = 0.0  # unmeasured positions
    return w


def test_kl_term_is_zero_at_the_base_with_zero_gradient():
    base, w = random_logits(0), weights(1)
    value, grad = jax.value_and_grad(kl_to_base_loss)(jnp.asarray(base), jnp.asarray(base), jnp.asarray(w))
    assert abs(float(value)) <= 1e-7
    assert float(jnp.max(jnp.abs(grad))) <= 1e-7


def test_kl_term_value_and_gradient_match_numpy():
    """KL = Σ w·Σ p(log p − log q) / Σ w; ∂/∂ logits_q = w/Σw · (softmax(q) − p); nothing flows to the base."""
    base, tuned, w = random_logits(0), random_logits(2), weights(1)
    value, (g_tuned, g_base) = jax.value_and_grad(kl_to_base_loss, argnums=(0, 1))(
        jnp.asarray(tuned), jnp.asarray(base), jnp.asarray(w))
    p, q = softmax64(base), softmax64(tuned)
    w64 = w.astype(np.float64)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    assert float(value) == pytest.approx((kl * w64).sum() / w64.sum(), abs=LAYER_TOL)
    np.testing.assert_allclose(np.asarray(g_tuned), (w64 / w64.sum())[..., None] * (q - p), atol=LAYER_TOL, rtol=0)
    assert float(jnp.max(jnp.abs(g_base))) == 0.0


def test_kl_term_gradient_matches_finite_differences():
    """Central differences in float64 along random directions agree with the autodiff gradient."""
    with jax.enable_x64(True):
        base, tuned = (jnp.asarray(random_logits(s), jnp.float64) for s in (0, 2))
        w = jnp.asarray(weights(1), jnp.float64)
        f = lambda x: kl_to_base_loss(x, base, w)
        grad = jax.grad(f)(tuned)
        eps = 1e-6
        for s in range(3):
            d = jnp.asarray(np.random.default_rng(10 + s).standard_normal(tuned.shape))
            fd = (f(tuned + eps * d) - f(tuned - eps * d)) / (2 * eps)
            assert float(fd) == pytest.approx(float(jnp.sum(grad * d)), rel=1e-6, abs=1e-9)


def tuned_lora(seed=0, b_scale=0.0):
    model = apply_lora(tiny_model(seed), 4, 8.0, rngs=nnx.Rngs(seed + 1))
    if b_scale:
        for path, var in nnx.iter_graph(model):
            if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
                var[...] = b_scale * np.random.default_rng(len(path)).standard_normal(var[...].shape).astype(
                    np.float32)
    return model


def chunked_kl(graphdef, frozen, batch, chunk):
    """The regularizer as the step computes it: tuned = (trainable, frozen), base = (zero adapters, frozen)."""

    def f(trainable):
        model = nnx.merge(graphdef, trainable, frozen)
        base = nnx.merge(graphdef, adapters_zeroed(trainable), frozen)
        args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
        total, weight = chunked_kl_to_base(model.logits, model.hidden(*args), base.logits, base.hidden(*args),
                                           batch["loss_weights"], chunk)
        return total / weight

    return f


def test_chunked_kl_on_a_lora_model():
    """Zero (value and gradient) for fresh adapters (B = 0); for trained ones equal to the plain term on full
    logits, value and gradient, with a chunk that does not divide the length."""
    batch = {k: jnp.asarray(v) for k, v in make_batch(rows=2, length=13).items()}
    graphdef, trainable, frozen = split(tuned_lora(b_scale=0.3), nnx.LoRAParam)
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, trainable)
    chunked = jax.jit(jax.value_and_grad(chunked_kl(graphdef, frozen, batch, 4)))
    value, grad = chunked(fresh)
    assert abs(float(value)) <= 1e-7
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) <= 1e-7

    def plain(t):
        args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
        tuned_logits = nnx.merge(graphdef, t, frozen)(*args)
        base_logits = nnx.merge(graphdef, adapters_zeroed(t), frozen)(*args)
        return kl_to_base_loss(tuned_logits, base_logits, batch["loss_weights"])

    v_chunked, g_chunked = chunked(trainable)
    v_plain, g_plain = jax.jit(jax.value_and_grad(plain))(trainable)
    assert float(v_plain) > 1e-3
    assert float(v_chunked) == pytest.approx(float(v_plain), rel=MODEL_TOL)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=MODEL_TOL * float(jnp.max(jnp.abs(b))))


def test_l2_to_base():
    rng = np.random.default_rng(0)
    base = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": {"c": rng.standard_normal(5).astype(np.float32)}}
    tuned = jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), base)
    value, grad = jax.value_and_grad(l2_to_base)(tuned, base)
    want = sum(np.sum((np.float64(t) - b) ** 2) for t, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(base)))
    assert float(value) == pytest.approx(want, rel=LAYER_TOL)
    for g, t, b in zip(jax.tree.leaves(grad), jax.tree.leaves(tuned), jax.tree.leaves(base)):
        np.testing.assert_allclose(np.asarray(g), 2 * (t - b), atol=LAYER_TOL)
    assert float(l2_to_base(base, base)) == 0.0


def measured_kl_after_training(kl_weight: float, steps: int = 25) -> float:
    """A short LoRA run on one task batch, with `kl_weight` · KL-to-base on a retain batch; returns the
    forgetting metric kl_to_base on the retain sequences."""
    graphdef, trainable, frozen = split(tuned_lora(seed=3), nnx.LoRAParam)
    task = {k: jnp.asarray(v) for k, v in make_batch(rows=4, length=16, seed=1, packed=False).items()}
    retain = {k: jnp.asarray(v) for k, v in make_batch(rows=4, length=16, seed=2, packed=False).items()}
    tx = optax.adam(3e-2)
    opt_state = tx.init(trainable)
    kl_term = chunked_kl(graphdef, frozen, retain, 8)

    @jax.jit
    def step(trainable, opt_state):
        def loss(t):
            model = nnx.merge(graphdef, t, frozen)
            h = model.hidden(task["input_ids"], task["positions"], task["segment_ids"])
            ce, w = chunked_cross_entropy(model.logits, h, task["targets"], task["loss_weights"], 8)
            return ce / w + kl_weight * kl_term(t)

        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for _ in range(steps):
        trainable, opt_state = step(trainable, opt_state)
    model = nnx.merge(graphdef, trainable, frozen)
    base = nnx.merge(graphdef, adapters_zeroed(trainable), frozen)
    seqs = [(np.r_[np.asarray(retain["input_ids"][i]), np.asarray(retain["targets"][i, -1:])],
             np.r_[0.0, np.asarray(retain["loss_weights"][i])]) for i in range(4)]
    sums = teacher_forced(model, seqs, base=base, chunk=16)
    return TokenSums.mean(sums.kl, sums.tokens)


def test_kl_regularizer_lowers_measured_kl():
    """Same seed and data: the run with the KL-to-base term ends at most half as far from the base."""
    without, with_kl = measured_kl_after_training(0.0), measured_kl_after_training(10.0)
    assert without > 0.01
    assert with_kl < 0.5 * without
