"""A new loss term is one function in the user's own code: a z-loss defined here, with no edit under ftjax/,
trains through the step, and the step's loss and gradients equal cross-entropy plus that term computed
directly (jax.grad of a plain [B, T, V] computation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ftjax.objectives.loss import token_cross_entropy
from ftjax.objectives.terms import BatchTerm, Forward, cross_entropy
from ftjax.sharding import make_mesh
from ftjax.train.optimizer import Optimizer, skip_nonfinite
from ftjax.train.state import init_state
from ftjax.train.step import make_train_step
from train_helpers import make_batch, tiny_model

MODEL_TOL = 1e-4
Z_WEIGHT = 0.3


def z_loss(weight: float) -> BatchTerm:
    """PaLM's z-loss: log²Z of the softmax normalizer per trained token, pulling logsumexp toward 0."""

    def fn(f: Forward) -> jax.Array:
        lse = jax.nn.logsumexp(f.model.logits(f.hidden).astype(jnp.float32), axis=-1)
        w = f.batch["loss_weights"].astype(jnp.float32)
        return jnp.sum(jnp.where(w != 0, w * lse**2, 0.0))

    return BatchTerm("z_loss", fn, weight)


def recording_optimizer() -> Optimizer:
    """Applies no update and keeps the step's gradients as its state, so the test reads them exactly."""
    record = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                          lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    return Optimizer(skip_nonfinite(record), lambda count: 0.0)


def direct(graphdef, frozen, batch):
    """(CE, z, CE + w·z) as token-weighted means over the whole batch, on full [B, T, V] logits."""

    def f(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(batch["input_ids"], batch["positions"],
                                                         batch["segment_ids"]).astype(jnp.float32)
        w = batch["loss_weights"]
        ce = jnp.sum(w * token_cross_entropy(logits, batch["targets"])) / jnp.sum(w)
        z = jnp.sum(w * jax.nn.logsumexp(logits, axis=-1) ** 2) / jnp.sum(w)
        return ce + Z_WEIGHT * z, (ce, z)

    return f


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_a_term_defined_here_trains_exactly_like_its_direct_computation():
    """Over two micro-batches: the term's sums add up to the global token-weighted mean."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = recording_optimizer()
    state = init_state(lambda: tiny_model(0), opt.tx, mesh, trainable=nnx.Param)
    batch = make_batch(4, 16)
    step = make_train_step(state, opt, mesh, terms=[cross_entropy(5), z_loss(Z_WEIGHT)], grad_accum=2)
    host = {k: jnp.asarray(v) for k, v in batch.items()}
    (total, (ce, z)), want_grads = jax.jit(jax.value_and_grad(direct(state.graphdef, state.frozen, host),
                                                              has_aux=True))(state.trainable)
    trainable = jax.tree.map(jnp.copy, state.trainable)
    _, opt_state, m = step(trainable, state.opt_state, state.frozen, batch, jax.random.key(0))
    assert float(z) > 1.0  # not vacuous: the term is large against CE (about log 96)
    assert float(m["loss"]) == pytest.approx(float(ce), rel=MODEL_TOL)  # `loss` stays the task CE
    assert float(m["z_loss"]) == pytest.approx(float(z), rel=MODEL_TOL)
    assert float(m["loss_total"]) == pytest.approx(float(total), rel=MODEL_TOL)
    got = dict(nnx.to_flat_state(opt_state.inner))
    for path, want in nnx.to_flat_state(want_grads):
        want, value = np.asarray(want[...]), np.asarray(got[path][...])
        np.testing.assert_allclose(value, want, atol=MODEL_TOL * np.max(np.abs(want)), rtol=MODEL_TOL,
                                   err_msg=str(path))
    ce_only = dict(nnx.to_flat_state(jax.grad(lambda t: direct(state.graphdef, state.frozen, host)(t)[1][0])(
        state.trainable)))
    head = ("lm_head", "kernel")
    assert not np.allclose(np.asarray(ce_only[head][...]), np.asarray(got[head][...]), rtol=1e-2)  # z counted
