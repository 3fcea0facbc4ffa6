"""The distillation loss term: the student's pass over its rows, the teacher's pass over the teacher's rows (the
same replies after a longer prompt, or the same rows), aligned by reply position, compared chunk by chunk.

Alignment: in a student row and its teacher row the trained positions hold the same reply tokens in the same order
(`ftjax.objectives.distill_data`), so the k-th trained student position reads the teacher's hidden state at the
k-th trained teacher position. The teacher's hidden states are gathered to the student's positions, then both
heads run one length chunk of logits at a time (rematerialized in the backward pass), as the chunked
cross-entropy does: memory [B, chunk, V] per model instead of [B, T, V]. The teacher side is a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.objectives.distill_loss import distill_sums
from ftjax.objectives.distill_data import TEACHER
from ftjax.objectives.loss import length_chunks
from ftjax.objectives.terms import BatchTerm, Forward


def aligned_positions(student_w_bt: jax.Array, teacher_w_bt: jax.Array) -> jax.Array:
    """int32 [B, T]: for each trained student position, the teacher row's position of the same reply token (the
    trained positions of equal rank); 0 where the student position is not trained."""
    t_len = teacher_w_bt.shape[1]
    trained = student_w_bt > 0
    rank = jnp.cumsum(trained, axis=1) - 1
    teacher_at = jax.vmap(lambda w: jnp.nonzero(w > 0, size=t_len, fill_value=0)[0])(teacher_w_bt)
    index = jnp.take_along_axis(teacher_at, jnp.clip(rank, 0, t_len - 1), axis=1)
    return jnp.where(trained, index, 0).astype(jnp.int32)


def distill_forward_sums(f: Forward, divergence: str, beta: float, temperature: float, chunk: int
                         ) -> tuple[jax.Array, jax.Array]:
    """(Σ w·divergence(teacher, student), Σ w) over the micro-batch's trained student positions."""
    weights = f.batch["loss_weights"]
    index = aligned_positions(weights, f.teacher.batch["loss_weights"])
    teacher_h = jnp.take_along_axis(jax.lax.stop_gradient(f.teacher.hidden), index[..., None], axis=1)
    student_logits, teacher_logits = f.model.logits, f.teacher.model.logits

    @jax.checkpoint
    def one_chunk(h, th, w):
        return distill_sums(student_logits(h), teacher_logits(th), w, divergence, beta=beta,
                            temperature=temperature)[0]

    def body(total, xs):
        return total + one_chunk(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), length_chunks(chunk, f.hidden, teacher_h, weights))
    return total, jnp.sum(weights.astype(jnp.float32))


def distill_term(divergence: str, beta: float, temperature: float, chunk: int) -> BatchTerm:
    """The objective's loss: the token-weighted mean divergence to the teacher over the student's reply tokens."""
    return BatchTerm("loss", lambda f: distill_forward_sums(f, divergence, beta, temperature, chunk)[0],
                     teacher_stream=TEACHER)
