"""Per-reply log-probs: the chunked token log-probs (head backward fused when the head is frozen) against plain
autodiff of log_softmax, reply sums against numpy, and packed pairs against the same pairs unpacked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.lora import apply_lora
from ftjax.objectives.reply_logps import model_pair_logps, pair_logps, reply_sums, token_logps
from preference_helpers import pair_rows
from train_helpers import TINY, tiny_model

RTOL = 1e-5
MODEL_TOL = 1e-4
B, T, D, V = 3, 10, 8, 50


@pytest.fixture(scope="module")
def data():
    kh, kw, kt, kg = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(kh, (B, T, D)), jax.random.normal(kw, (V, D)), jax.random.randint(kt, (B, T), 0, V),
            jax.random.normal(kg, (B, T)))


def _reference(h, w, targets, vocab_major):
    logp = jax.nn.log_softmax(h @ (w.T if vocab_major else w), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk", [4, 10, 64])  # ragged, one chunk, longer than T
@pytest.mark.parametrize("head_trained", [True, False])
def test_token_logps_and_gradients_match_autodiff(data, vocab_major, chunk, head_trained):
    h, w_vd, targets, g = data
    w = w_vd if vocab_major else w_vd.T
    want = _reference(h, w, targets, vocab_major)
    got = token_logps(h, w, targets, chunk, vocab_major=vocab_major)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL)
    argnums = (0, 1) if head_trained else (0,)
    f = lambda fn: lambda *a: jnp.sum(g * fn(*a))  # noqa: E731  a non-uniform cotangent
    want_g = jax.grad(f(lambda h, w: _reference(h, w, targets, vocab_major)), argnums)(h, w)
    got_g = jax.grad(f(lambda h, w: token_logps(h, w, targets, chunk, vocab_major=vocab_major)), argnums)(h, w)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL)


def test_reply_sums_and_pairs_match_numpy():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(2, 9)).astype(np.float32)
    reply_ids = np.array([[0, 1, 1, 0, 2, 2, 2, 3, 4], [0, 0, 2, 1, 0, 0, 0, 0, 0]], np.int32)
    sums, counts = reply_sums(jnp.asarray(logp), jnp.asarray(reply_ids), max_pairs=2)
    for r in range(2):
        for s in range(4):
            np.testing.assert_allclose(sums[r, s], logp[r][reply_ids[r] == s + 1].sum(), rtol=RTOL)
            assert counts[r, s] == (reply_ids[r] == s + 1).sum()
    pairs, valid = pair_logps(jnp.asarray(logp), jnp.asarray(reply_ids), max_pairs=2)
    assert valid.tolist() == [True, True, True, False]
    np.testing.assert_allclose(pairs.rejected[2], logp[1, 2], rtol=RTOL)
    np.testing.assert_allclose(pairs.chosen_tokens, [2, 1, 1, 0])


@pytest.fixture(scope="module")
def lora_model():
    model = tiny_model(0)
    apply_lora(model, 4, 8.0, rngs=nnx.Rngs(1))
    for path, p in nnx.iter_graph(model):
        if isinstance(p, nnx.LoRAParam) and path[-1] == "lora_b":
            p[...] = 0.1 * jax.random.normal(jax.random.key(len(path)), p[...].shape)
    return model


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_packed_pairs_give_the_log_probs_of_unpacked_pairs(lora_model):
    rng = np.random.default_rng(3)
    ids = lambda n: rng.integers(3, TINY.vocab_size, n).tolist()  # noqa: E731
    pairs = [(ids(4), ids(3), ids(5)), (ids(2), ids(6), ids(1)), (ids(5), ids(2), ids(2))]
    packed, _ = model_pair_logps(lora_model, pair_rows(pairs, 48, True), max_pairs=3, chunk=7)
    alone, valid = model_pair_logps(lora_model, pair_rows(pairs, 16, False), max_pairs=1, chunk=7)
    assert bool(valid.all())
    for a, b in zip(packed, alone):
        np.testing.assert_allclose(a, b, rtol=MODEL_TOL, atol=MODEL_TOL)
    np.testing.assert_array_equal(alone.chosen_tokens, [3, 6, 2])


def test_preference_config_refuses_bad_hyper_parameters():
    from ftjax.errors import ConfigError
    from ftjax.objectives.pair_losses import PreferenceConfig

    for kw, msg in [(dict(objective="kto"), "not a preference objective"), (dict(objective="dpo", beta=0.0), "beta"),
                    (dict(objective="dpo", label_smoothing=0.5), r"\[0, 0.5\)"),
                    (dict(objective="ipo", label_smoothing=0.1), "not ipo")]:
        with pytest.raises(ConfigError, match=msg):
            PreferenceConfig(**kw)
    assert PreferenceConfig("dpo").needs_reference and not PreferenceConfig("simpo").needs_reference


def test_accuracy_compares_summed_or_averaged_log_probs_by_objective():
    from ftjax.objectives.pair_losses import PreferenceConfig, ReplyLogps, preference_accuracy

    # chosen: sum -6 over 6 tokens (avg -1); rejected: sum -4 over 2 tokens (avg -2)
    p = ReplyLogps(jnp.array([-6.0]), jnp.array([-4.0]), jnp.array([6.0]), jnp.array([2.0]))
    assert float(preference_accuracy(PreferenceConfig("dpo"), p)[0]) == 0.0  # summed: -6 < -4
    for objective in ("ipo", "orpo", "simpo"):
        assert float(preference_accuracy(PreferenceConfig(objective), p)[0]) == 1.0  # per token: -1 > -2


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_micro_batch_sums_combine_into_the_whole_batch_mean(lora_model):
    """Per-pair sums of two halves of a batch, divided by the global pair count, give the whole batch's mean."""
    from ftjax.objectives.pair_losses import PreferenceConfig, metric_means
    from ftjax.objectives.preference_term import global_pairs, preference_sums

    rng = np.random.default_rng(5)
    ids = lambda n: rng.integers(3, TINY.vocab_size, n).tolist()  # noqa: E731
    pairs = [(ids(3), ids(2 + k % 3), ids(1 + k % 2)) for k in range(4)]
    batch = pair_rows(pairs, 16, packed=False)
    cfg = PreferenceConfig("simpo", beta=2.0, gamma=0.3)
    whole = preference_sums(cfg, lora_model, batch, 1, 8)
    halves = [preference_sums(cfg, lora_model, {k: v[s] for k, v in batch.items()}, 1, 8)
              for s in (slice(0, 1), slice(1, 4))]
    combined = {k: halves[0][k] + halves[1][k] for k in whole}
    assert float(global_pairs(batch)) == float(whole["pairs"]) == 4
    for k, v in metric_means(whole).items():
        np.testing.assert_allclose(metric_means(combined)[k], v, rtol=RTOL, atol=RTOL)
