"""Rollouts packed into training rows: every completion token is a target of weight 1 with its completion's
advantage and its own per-token value; prompts and padding weigh 0; the GRPO loss on the rows equals the loss
written out over the unpacked completions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.objectives import grpo_loss
from ftjax.objectives.rollout_rows import pack_rollouts

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
COMPLETIONS = [[20, 21], [22, 23, 24, 2], [25], [26, 27, 28, 29, 30]]


def _rollouts(seed=0):
    rng = np.random.default_rng(seed)
    adv = rng.normal(size=len(PROMPTS)).astype(np.float32)
    old = [rng.normal(size=len(c)).astype(np.float32) - 2 for c in COMPLETIONS]
    return adv, old


def test_each_completion_token_is_a_target_with_its_values():
    adv, old = _rollouts()
    rows = pack_rollouts(PROMPTS, COMPLETIONS, adv, seq_len=10, rows=3, per_token={"old_logps": old})
    assert rows["input_ids"].shape == (3, 10)
    found = []
    for r in range(3):
        for seg in set(rows["segment_ids"][r].tolist()) - {0}:
            at = rows["segment_ids"][r] == seg
            tokens = np.concatenate([rows["input_ids"][r, at][:1], rows["targets"][r, at]])
            i = next(i for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)) if p + c == tokens.tolist())
            trained = rows["loss_weights"][r, at] == 1
            assert rows["targets"][r, at][trained].tolist() == COMPLETIONS[i]  # exactly the completion
            assert np.all(rows["advantages"][r, at][trained] == adv[i])
            assert np.all(rows["advantages"][r, at][~trained] == 0)
            np.testing.assert_array_equal(rows["old_logps"][r, at][trained], old[i])
            assert rows["positions"][r, at].tolist() == list(range(at.sum()))
            found.append(i)
    assert sorted(found) == list(range(len(PROMPTS)))
    assert np.all(rows["loss_weights"][rows["segment_ids"] == 0] == 0)


def test_too_few_rows_or_too_long_is_an_error():
    adv, _ = _rollouts()
    with pytest.raises(ValueError, match="need 2 rows of 10; the batch has 1"):
        pack_rollouts(PROMPTS, COMPLETIONS, adv, seq_len=10, rows=1)
    with pytest.raises(ValueError, match="≤ 5 tokens in all \\(the longest has 6\\)"):
        pack_rollouts(PROMPTS, COMPLETIONS, adv, seq_len=4)


@pytest.mark.parametrize("loss_type", grpo_loss.LOSS_TYPES)
def test_loss_on_rows_equals_loss_over_completions(loss_type):
    """The per-type formula written per completion (TRL's padded layout, checked against TRL in test_grpo_loss)."""
    adv, old = _rollouts()
    rng = np.random.default_rng(1)
    logps = [o + rng.normal(size=o.shape).astype(np.float32) * 0.2 for o in old]
    cfg = grpo_loss.GrpoLoss(loss_type, epsilon_high=3.0 if loss_type == "cispo" else None, max_completion_length=6)
    rows = pack_rollouts(PROMPTS, COMPLETIONS, adv, seq_len=10, per_token={"old_logps": old, "logps": logps})
    mask, seg = jnp.asarray(rows["loss_weights"]), jnp.asarray(rows["segment_ids"])
    got = grpo_loss.loss_sum(cfg, rows["logps"], rows["old_logps"], rows["advantages"], mask, seg) / \
        grpo_loss.normalizer(cfg, mask, seg)
    per_completion = []
    for a, lp, o in zip(adv, logps, old):
        if loss_type == "rloo":
            ratio = np.exp(np.sum(lp - o))
            per_completion.append(-min(ratio * a, np.clip(ratio, 0.8, 1.2) * a))
            continue
        ratio = np.exp(lp - o)
        if loss_type == "cispo":
            per_completion.append(-np.minimum(ratio, 3.0) * a * lp)
        else:
            per_completion.append(-np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a))
    n, tokens = len(adv), sum(len(c) for c in COMPLETIONS)
    total = sum(float(np.sum(x)) for x in per_completion)
    if loss_type in ("grpo", "rloo"):
        want = np.mean([np.mean(x) for x in per_completion])
    else:
        want = total / (n * 6 if loss_type == "dr_grpo" else tokens)
    assert float(got) == pytest.approx(float(want), abs=1e-5, rel=1e-5)
