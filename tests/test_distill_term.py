"""The distillation term on real model passes: the student's reply positions read the teacher's at the same reply
token after a longer prompt (context distillation), the value equals a numpy divergence of the two models' logits
at those positions, and only the student gets gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.objectives.distill_source import with_reply
from ftjax.objectives.distill_term import aligned_positions, distill_forward_sums
from ftjax.objectives.terms import Forward
from train_helpers import TINY, tiny_model

TOL = 1e-5  # fp32: the divergence of the same logits, one layer's worth of math
SEQ = 24


def _rows(seed: int = 0):
    """Two examples: student rows (prompt + reply) and teacher rows (a longer prompt + the same reply)."""
    rng = np.random.default_rng(seed)
    student, teacher, spans = [], [], []
    for prompt_len, prefix_len, reply_len in ((4, 7, 5), (6, 3, 8)):
        prompt = rng.integers(1, TINY.vocab_size, prompt_len).tolist()
        prefix = rng.integers(1, TINY.vocab_size, prefix_len).tolist()
        reply = rng.integers(1, TINY.vocab_size, reply_len).tolist()
        student.append(with_reply(prompt, reply, SEQ))
        teacher.append(with_reply(prefix + prompt, reply, SEQ))
        spans.append((prompt_len, prefix_len + prompt_len, reply_len))
    stack = lambda rows: {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    return stack(student), stack(teacher), spans


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_divergence(s_logits, t_logits, divergence, temperature):
    s_logits, t_logits = s_logits.astype(np.float64), t_logits.astype(np.float64)
    s, t = _log_softmax(s_logits / temperature), _log_softmax(t_logits / temperature)
    if divergence == "forward_kl":
        return (np.exp(t) * (t - s)).sum(-1)
    return (np.exp(s) * (s - t)).sum(-1)


def test_aligned_positions_pair_each_reply_token():
    student, teacher, spans = _rows()
    index = np.asarray(aligned_positions(jnp.asarray(student["loss_weights"]), jnp.asarray(teacher["loss_weights"])))
    for r, (p, tp, n) in enumerate(spans):
        np.testing.assert_array_equal(index[r, p - 1:p - 1 + n], np.arange(tp - 1, tp - 1 + n))
        np.testing.assert_array_equal(student["targets"][r, p - 1:p - 1 + n],
                                      teacher["targets"][r, index[r, p - 1:p - 1 + n]])  # the same reply token
        assert not index[r, :p - 1].any() and not index[r, p - 1 + n:].any()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_value_matches_numpy_and_only_the_student_gets_gradients(divergence, temperature):
    student_rows, teacher_rows, spans = _rows(1)
    s_graph, s_state = nnx.split(tiny_model(0))
    t_graph, t_state = nnx.split(tiny_model(1))
    t_state = jax.tree.map(lambda x: 4 * x, t_state)  # a peaked teacher: a divergence of order 1, not 1e-3
    batch = {k: jnp.asarray(v) for k, v in student_rows.items()}
    tbatch = {k: jnp.asarray(v) for k, v in teacher_rows.items()}

    def loss(s_state, t_state):
        student, teacher = nnx.merge(s_graph, s_state), nnx.merge(t_graph, t_state)
        t_pass = Forward(teacher, teacher.hidden(tbatch["input_ids"], tbatch["positions"], tbatch["segment_ids"]),
                         tbatch)
        f = Forward(student, student.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"]), batch,
                    teacher=t_pass)
        total, weight = distill_forward_sums(f, divergence, 0.5, temperature, chunk=5)  # chunks across the reply
        return total / weight

    value, (s_grad, t_grad) = jax.value_and_grad(loss, argnums=(0, 1))(s_state, t_state)
    s_logits = np.asarray(nnx.merge(s_graph, s_state)(batch["input_ids"], batch["positions"], batch["segment_ids"]))
    t_logits = np.asarray(nnx.merge(t_graph, t_state)(tbatch["input_ids"], tbatch["positions"],
                                                        tbatch["segment_ids"]))
    per_token = [_numpy_divergence(s_logits[r, p - 1:p - 1 + n], t_logits[r, tp - 1:tp - 1 + n], divergence,
                                   temperature) for r, (p, tp, n) in enumerate(spans)]
    expected = np.concatenate(per_token).mean()
    assert expected > 0.1  # two different models: a divergence to learn
    np.testing.assert_allclose(float(value), expected, rtol=TOL)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(t_grad))  # the teacher is a constant
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(s_grad)) > 0
