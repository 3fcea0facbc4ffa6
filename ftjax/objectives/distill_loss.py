"""Distillation losses per token from student and teacher logits: forward KL, reverse KL, TRL GKD's generalized JSD.

Each returns (Σ w·divergence, Σ w) over a [B, T, V] chunk of logits, so a train step's micro-batch sums add up
exactly before the one division. The teacher is a constant (stop_gradient): only the student learns.

With temperature τ both sides are softmax(logits / τ); generalized JSD with β (Agarwal et al., 2023, eq. 1, as
TRL's `GKDTrainer.generalized_jsd_loss` computes it), m = β·p_teacher + (1 − β)·p_student:
    JSD_β = β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m);  β = 0: KL(teacher ‖ student) (forward KL),
    β = 1: KL(student ‖ teacher) (reverse KL), exactly as TRL special-cases them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ftjax.evaluation.divergence import token_kl

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def generalized_jsd(student_btv: jax.Array, teacher_btv: jax.Array, beta: float = 0.5,
                    temperature: float = 1.0) -> jax.Array:
    """JSD_β(teacher, student) per position ([..., V] -> [...]) at `temperature`; β in [0, 1], a Python float."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD needs 0 <= beta <= 1, got {beta}")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    student = student_btv.astype(jnp.promote_types(student_btv.dtype, jnp.float32)) / temperature
    teacher = jax.lax.stop_gradient(teacher_btv).astype(student.dtype) / temperature
    if beta == 0.0:
        return token_kl(teacher, student)
    if beta == 1.0:
        return token_kl(student, teacher)
    log_s = jax.nn.log_softmax(student, axis=-1)
    log_t = jax.nn.log_softmax(teacher, axis=-1)
    log_m = jnp.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    kl_teacher = jnp.sum(jnp.exp(log_t) * (log_t - log_m), axis=-1)
    kl_student = jnp.sum(jnp.exp(log_s) * (log_s - log_m), axis=-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def token_divergence(student_btv: jax.Array, teacher_btv: jax.Array, divergence: str = "jsd", *,
                     beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """The named divergence per position: forward_kl = KL(teacher ‖ student), reverse_kl = KL(student ‖ teacher),
    jsd = JSD_β (β is read only by jsd)."""
    if divergence == "forward_kl":
        beta = 0.0
    elif divergence == "reverse_kl":
        beta = 1.0
    elif divergence != "jsd":
        raise ValueError(f"unknown distillation divergence {divergence!r}; one of {', '.join(DIVERGENCES)}")
    return generalized_jsd(student_btv, teacher_btv, beta, temperature)


def distill_sums(student_btv: jax.Array, teacher_btv: jax.Array, weights_bt: jax.Array, divergence: str = "jsd",
                 *, beta: float = 0.5, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(Σ w·divergence, Σ w) over the positions [B, T]; positions of weight 0 add exactly 0 (even if their logits
    are not finite), so padded chunks and prompt tokens cost nothing."""
    value = token_divergence(student_btv, teacher_btv, divergence, beta=beta, temperature=temperature)
    w = weights_bt.astype(value.dtype)
    return jnp.sum(jnp.where(w != 0, value * w, 0.0)), jnp.sum(w)
