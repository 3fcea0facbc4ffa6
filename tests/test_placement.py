"""Eval and generation rows split over the mesh's batch axes give what one device gives: the teacher-forced sums
(to float rounding) and the greedy and sampled tokens (exactly), with row counts that do not divide the mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.evaluation.token_stats import teacher_forced
from ftjax.generate import generate_tokens
from ftjax.interop.sources import load_pretrained
from ftjax.placement import model_mesh, split_rows
from ftjax.sharding import make_mesh

SUM_RTOL = 1e-6  # per-sequence NLL sums of ~10 tokens: a split changes only the reduction order
KL_ATOL = 1e-5  # KL sums: differences of ~10-nat log-probs, fp32 rounding of ~1e-6 a token (~10 tokens)
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def one_device():
    return load_pretrained("tiny-random-llama", "float32", "float32")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(37):  # 3 batches of 13 rows at most (none divides 8), one length bucket: one compile
        n = int(rng.integers(34, 64))
        trained = np.zeros(n, bool)
        trained[-9:] = True
        seqs.append((rng.integers(0, 49152, n), trained))
    prompts = [list(rng.integers(0, 49152, int(rng.integers(5, 40)))) for _ in range(5)]
    return seqs, prompts


def _scaled(model):
    """Another model on the same devices (every weight x 1.05): a non-zero KL to `model`."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.05, state))


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2)], ids=["data8", "d2f2t2"])
def test_split_rows_give_the_one_device_results(one_device, inputs, sizes):
    seqs, prompts = inputs
    model = load_pretrained("tiny-random-llama", "float32", "float32", mesh=make_mesh(*sizes))
    assert model_mesh(nnx.state(one_device)) is None and model_mesh(nnx.state(model)).size == 8
    with split_rows(nnx.state(model)) as split:
        assert split.shards == sizes[0] * sizes[1] and split.rows(13) == -(-13 // split.shards) * split.shards

    want, got = (teacher_forced(_scaled(m), seqs, base=m, batch_size=13) for m in (one_device, model))
    assert np.all(want.kl > 0)
    np.testing.assert_allclose(got.nll, want.nll, rtol=SUM_RTOL)
    np.testing.assert_allclose(got.base_nll, want.base_nll, rtol=SUM_RTOL)
    np.testing.assert_allclose(got.kl, want.kl, rtol=0, atol=KL_ATOL)
    np.testing.assert_array_equal(got.tokens, want.tokens)

    np.testing.assert_array_equal(generate_tokens(model, prompts, max_new_tokens=6),
                                  generate_tokens(one_device, prompts, max_new_tokens=6))
    sample = dict(max_new_tokens=6, temperature=1.0, seed=3, return_logits=True)
    (tokens, logits), (want_tokens, want_logits) = (generate_tokens(m, prompts, **sample) for m in (model, one_device))
    np.testing.assert_array_equal(tokens, want_tokens)  # the same draws: keys do not depend on the split
    np.testing.assert_allclose(logits, want_logits, atol=LOGIT_TOL)
    assert tokens.shape == (len(prompts), 6) and jax.process_count() == 1
