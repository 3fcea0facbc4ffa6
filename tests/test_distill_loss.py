"""Distillation losses against TRL GKD's generalized JSD (torch autograd for the gradient) and a numpy KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax.objectives.distill_loss import distill_sums, token_divergence

TOL = 1e-5  # fp32, one layer's worth of math
B, T, V = 2, 6, 13


def _logits(seed):
    rng = np.random.default_rng(seed)
    student = (rng.standard_normal((B, T, V)) * 3).astype(np.float32)
    teacher = (rng.standard_normal((B, T, V)) * 3).astype(np.float32)
    weights = (rng.random((B, T)) < 0.7).astype(np.float32)
    weights[0, 0] = 1.0
    return student, teacher, weights


def _trl_jsd(student, teacher, weights, beta, temperature):
    """TRL's loss (mean over unmasked positions) and its gradient w.r.t. the student logits."""
    from trl.experimental.gkd import GKDTrainer

    s = torch.tensor(student, requires_grad=True)
    labels = torch.where(torch.tensor(weights) != 0, 1, -100)
    loss = GKDTrainer.generalized_jsd_loss(s, torch.tensor(teacher), labels=labels, beta=beta,
                                           temperature=temperature)
    loss.backward()
    return float(loss), s.grad.numpy()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_generalized_jsd_equals_trl(beta, temperature):
    student, teacher, weights = _logits(int(beta * 10 + temperature * 100))
    expected, expected_grad = _trl_jsd(student, teacher, weights, beta, temperature)

    def mean_loss(s, t):
        total, weight = distill_sums(s, t, jnp.asarray(weights), "jsd", beta=beta, temperature=temperature)
        return total / weight

    value, (grad_s, grad_t) = jax.value_and_grad(mean_loss, argnums=(0, 1))(jnp.asarray(student),
                                                                            jnp.asarray(teacher))
    np.testing.assert_allclose(float(value), expected, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(grad_s), expected_grad, rtol=TOL, atol=TOL)
    assert np.array_equal(np.asarray(grad_t), np.zeros_like(teacher))  # the teacher is a constant


def _np_kl(logits_p, logits_q, temperature):
    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logp, logq = log_softmax(logits_p), log_softmax(logits_q)
    return (np.exp(logp) * (logp - logq)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_forward_and_reverse_kl_match_numpy(temperature):
    student, teacher, weights = _logits(7)
    for divergence, expected in (("forward_kl", _np_kl(teacher, student, temperature)),
                                 ("reverse_kl", _np_kl(student, teacher, temperature))):
        total, weight = distill_sums(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), divergence,
                                     temperature=temperature)
        np.testing.assert_allclose(float(total), (expected * weights).sum(), rtol=TOL, atol=TOL)
        assert float(weight) == weights.sum()
        per_token = token_divergence(jnp.asarray(student), jnp.asarray(teacher), divergence, temperature=temperature)
        np.testing.assert_allclose(np.asarray(per_token), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_reaches_the_student_only(divergence):
    student, teacher, weights = _logits(3)
    grads = jax.grad(lambda s, t: distill_sums(s, t, jnp.asarray(weights), divergence)[0], argnums=(0, 1))(
        jnp.asarray(student), jnp.asarray(teacher))
    assert np.array_equal(np.asarray(grads[1]), np.zeros_like(teacher))
    # the student's gradient (its values: against torch autograd of TRL's loss above) is zero where weight is 0
    student_grad = np.asarray(grads[0])
    assert np.array_equal(student_grad[weights == 0], np.zeros_like(student[weights == 0]))
    assert np.all(np.abs(student_grad[weights != 0]).sum(-1) > 0)


def test_micro_batch_sums_are_exact_and_masked_positions_free():
    student, teacher, weights = _logits(11)
    whole = distill_sums(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights))
    halves = [distill_sums(jnp.asarray(student[i:i + 1]), jnp.asarray(teacher[i:i + 1]), jnp.asarray(weights[i:i + 1]))
              for i in range(B)]
    np.testing.assert_allclose(float(whole[0]), sum(float(h[0]) for h in halves), rtol=TOL)
    assert float(whole[1]) == sum(float(h[1]) for h in halves)
    junk = student.copy()
    junk[weights == 0] = np.nan  # what a padded chunk's positions may hold: they add exactly nothing
    assert float(distill_sums(jnp.asarray(junk), jnp.asarray(teacher), jnp.asarray(weights))[0]) == float(whole[0])


def test_bad_settings_are_refused():
    student, teacher, _ = _logits(0)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(jnp.asarray(student), jnp.asarray(teacher), "jsd", beta=1.5)
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        token_divergence(jnp.asarray(student), jnp.asarray(teacher), "kl")
