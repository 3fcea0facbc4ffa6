"""Advantages against TRL 1.16's own code, and DAPO's dynamic sampling against a numpy reference.

TRL computes advantages inside its long rollout method (`_generate_and_score_completions`); the tests run that
method's own advantage lines (read from its source, from the weighted reward sum to `nan_to_num`) on a stub
trainer with the same rewards, so a change in TRL's formula shows up here.
"""

from __future__ import annotations

import inspect
import textwrap
import types

import numpy as np
import pytest

from ftjax.objectives import advantages as adv_lib

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

TOL = 1e-5
G = 4


def _trl_block(cls, start: str, end: str) -> str:
    """The lines of `cls._generate_and_score_completions` from the first starting with `start` to the next
    starting with `end`, dedented."""
    lines = inspect.getsource(cls._generate_and_score_completions).splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    last = next(i for i in range(first, len(lines)) if lines[i].strip().startswith(end))
    return textwrap.dedent("\n".join(lines[first:last + 1]))


def _run(block: str, **names) -> dict:
    from trl.trainer.utils import nanstd

    scope = dict(torch=torch, nanstd=nanstd, device="cpu", gather=lambda x: x, **names)
    exec(block, scope)  # noqa: S102 - TRL's own lines, from its installed source
    return scope


def _per_func(rewards):
    """TRL's `rewards_per_func` [N, 1] and its unscorable mask, for one reward function of weight 1."""
    per_func = torch.tensor(np.asarray(rewards, np.float32))[:, None]
    return dict(rewards_per_func=per_func, unscorable_mask=torch.isnan(per_func).all(dim=1))


REWARDS = {
    "mixed": [0.0, 1.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.1, 0.7],  # group 2: all equal
    "all_equal": [0.5] * 8,
    "unscorable": [0.3, np.nan, 0.9, 0.1, np.nan, np.nan, np.nan, np.nan, 0.0, 1.0, 1.0, np.nan],
}


def _numpy_group_reference(rewards, scale):
    """GRPO's advantage written out: (r − group mean) / (std + 1e-4), std Bessel-corrected, per group or batch."""
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    std = np.std(r, axis=1, ddof=1, keepdims=True) if scale == "group" else np.std(r, ddof=1)
    a = r - r.mean(axis=1, keepdims=True)
    return (a if scale == "none" else a / (std + 1e-4)).reshape(-1)


@pytest.mark.parametrize("scale", adv_lib.SCALES)
@pytest.mark.parametrize("case", list(REWARDS))
def test_group_advantages_match_trl(case, scale):
    from trl import GRPOTrainer

    block = _trl_block(GRPOTrainer, "if self.multi_objective_aggregation ==", "advantages = torch.nan_to_num")
    stub = types.SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale,
                                 reward_weights=torch.ones(1))
    trl = _run(block, self=stub, num_generations=G, **_per_func(REWARDS[case]))
    got, zero_std = adv_lib.group_advantages(REWARDS[case], G, scale)
    np.testing.assert_allclose(got, trl["advantages"].numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(zero_std, trl["is_std_zero"].numpy())
    assert np.all(np.isfinite(got))
    if case != "unscorable":
        np.testing.assert_allclose(got, _numpy_group_reference(REWARDS[case], scale), atol=TOL, rtol=TOL)


def test_equal_rewards_give_zero_advantage():
    got, zero_std = adv_lib.group_advantages(REWARDS["mixed"], G)
    assert np.all(got[4:8] == 0.0) and np.all(zero_std[4:8]) and not np.any(zero_std[:4])
    assert float(np.mean(zero_std)) == pytest.approx(1 / 3)  # frac_reward_zero_std


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("case", list(REWARDS))
def test_rloo_matches_trl(case, beta, normalize):
    from trl import RLOOTrainer

    block = _trl_block(RLOOTrainer, "rewards = (rewards_per_func * self.reward_weights.to(device)",
                       "advantages = torch.nan_to_num")
    n = len(REWARDS[case])
    rng = np.random.default_rng(0)
    old, ref = (torch.tensor(rng.normal(size=(n, 5)).astype(np.float32)) for _ in range(2))
    mask = torch.tensor((np.arange(5)[None] < rng.integers(1, 6, size=(n, 1))).astype(np.float32))
    stub = types.SimpleNamespace(reward_weights=torch.ones(1), reward_clip_range=None, beta=beta,
                                 normalize_advantages=normalize)
    trl = _run(block, self=stub, num_generations=G, old_per_token_logps=old, ref_per_token_logps=ref,
               completion_mask=mask, **_per_func(REWARDS[case]))
    kl = ((old - ref) * mask).sum(-1).numpy()
    got = adv_lib.rloo_advantages(REWARDS[case], G, normalize=normalize, kl=kl, beta=beta)
    np.testing.assert_allclose(got, trl["advantages"].numpy(), atol=TOL, rtol=TOL)


def test_rloo_baseline_by_hand():
    r = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
    want = r - (r.sum() - r) / 3
    np.testing.assert_allclose(adv_lib.rloo_advantages(r, 4), want, atol=TOL)


def _dynamic_reference(batches, groups, max_draws):
    """DAPO's dynamic sampling written out: informative groups in draw order, then the first uninformative ones."""
    useful, useless, draws = [], [], 0
    for items, rewards in batches:
        if len(useful) >= groups or draws == max_draws:
            break
        draws += 1
        for item, row in zip(items, rewards):
            (useful if len(set(row.tolist())) > 1 else useless).append((item, row))
    chosen = (useful + useless)[:groups]
    return [c[0] for c in chosen], np.stack([c[1] for c in chosen]), draws


@pytest.mark.parametrize("max_draws", [1, 2, 10])
def test_dynamic_sampling_refill_matches_numpy(max_draws):
    rng = np.random.default_rng(3)
    batches = []
    for b in range(6):
        rewards = rng.integers(0, 2, size=(4, G)).astype(np.float32)  # binary rewards: many all-equal groups
        batches.append(([f"prompt{b}.{i}" for i in range(4)], rewards))
    want = _dynamic_reference(batches, 4, max_draws)
    it = iter(batches)
    got = adv_lib.dynamic_sampling(lambda: next(it), 4, max_draws)
    assert got[0] == want[0] and got[2] == want[2]
    np.testing.assert_array_equal(got[1], want[1])
    if max_draws == 10:
        assert adv_lib.informative(got[1]).all() and got[2] > 1  # it did refill, and kept only informative groups


def test_dynamic_sampling_drops_equal_groups_and_refills():
    draws = iter([(["a", "b"], np.array([[1, 1], [0, 1]], np.float32)),
                  (["c", "d"], np.array([[0, 0], [1, 0]], np.float32))])
    items, rewards, n = adv_lib.dynamic_sampling(lambda: next(draws), 2, 5)
    assert items == ["b", "d"] and n == 2
    np.testing.assert_array_equal(rewards, [[0, 1], [1, 0]])
