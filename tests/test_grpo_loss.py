"""GRPO-family loss over packed rows against TRL 1.16's own `GRPOTrainer._compute_loss` on the same log-probs.

TRL's method runs on a stub trainer (its attributes as `GRPOTrainer.__init__` sets them for one process, no
gradient accumulation, no vLLM) whose policy pass returns the given log-probs; its loss, the gradient w.r.t.
those log-probs (torch autograd) and its logged metrics are compared with ftjax's on the same completions packed
into rows with prompts and padding.
"""

from __future__ import annotations

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.errors import ConfigError
from ftjax.objectives import grpo_loss
from ftjax.objectives.grpo_loss import GrpoLoss

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

TOL = 1e-5  # fp32, one layer's worth of arithmetic
COMPLETIONS = (5, 1, 7, 3, 6, 2)  # completion lengths; prompts of 3, 2, 4, ... tokens are packed before each
ROWS, ROW_LEN, MAX_LEN = 2, 24, 8
METRICS = grpo_loss.CLIP_METRICS + ("kl", "entropy")


def _packing():
    """Per completion (row, first completion position); segment ids and the completion mask of the rows."""
    seg = np.zeros((ROWS, ROW_LEN), np.int32)
    mask = np.zeros((ROWS, ROW_LEN), np.float32)
    places, row, pos, segment = [], 0, 0, 1
    for i, n in enumerate(COMPLETIONS):
        prompt = 2 + i % 3
        if pos + prompt + n > ROW_LEN:
            row, pos, segment = row + 1, 0, 1
        seg[row, pos:pos + prompt + n] = segment
        mask[row, pos + prompt:pos + prompt + n] = 1
        places.append((row, pos + prompt))
        pos, segment = pos + prompt + n, segment + 1
    return places, seg, mask


def _case(seed, beta, same_old=False):
    """TRL's padded [N, MAX_LEN] tensors and the same values packed into ftjax's [ROWS, ROW_LEN] rows."""
    rng = np.random.default_rng(seed)
    n = len(COMPLETIONS)
    padded = {k: rng.normal(size=(n, MAX_LEN)).astype(np.float32) * s - o
              for k, s, o in (("logps", 0.5, 1.5), ("entropy", 0.3, -2.0))}
    padded["old"] = padded["logps"] if same_old else (padded["logps"] + rng.normal(size=(n, MAX_LEN)) * 0.3
                                                      ).astype(np.float32)
    padded["ref"] = (padded["logps"] + rng.normal(size=(n, MAX_LEN)) * 0.2).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    padded["mask"] = (np.arange(MAX_LEN)[None] < np.array(COMPLETIONS)[:, None]).astype(np.float32)
    places, seg, mask = _packing()
    packed = {k: np.full((ROWS, ROW_LEN), -0.7, np.float32) for k in ("logps", "entropy", "old", "ref")}
    packed["adv"] = np.zeros((ROWS, ROW_LEN), np.float32)
    for i, ((row, start), length) in enumerate(zip(places, COMPLETIONS)):
        for k in ("logps", "entropy", "old", "ref"):
            packed[k][row, start:start + length] = padded[k][i, :length]
        packed["adv"][row, start:start + length] = adv[i]
    packed.update(mask=mask, seg=seg)
    return padded, adv, packed, places


def _trl(cfg: GrpoLoss, padded, adv):
    """TRL's loss, d loss / d logps [N, MAX_LEN] and metrics, from `GRPOTrainer._compute_loss` on a stub
    (`RLOOTrainer._compute_loss` for rloo)."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer

    logps = torch.tensor(padded["logps"], requires_grad=True)
    mask = torch.tensor(padded["mask"])
    n = mask.shape[0]
    stub = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=cfg.beta, loss_type=cfg.loss_type, epsilon_low=cfg.epsilon, epsilon_high=cfg.high,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=cfg.max_completion_length,
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                          gather_for_metrics=lambda x: x),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.tensor(padded["entropy"]), None))
    inputs = dict(prompt_ids=torch.zeros((n, 1), dtype=torch.long), prompt_mask=torch.ones((n, 1)),
                  completion_ids=torch.zeros((n, MAX_LEN), dtype=torch.long), completion_mask=mask,
                  advantages=torch.tensor(adv), old_per_token_logps=torch.tensor(padded["old"]),
                  ref_per_token_logps=torch.tensor(padded["ref"]), num_items_in_batch=mask.sum(),
                  old_logps=(torch.tensor(padded["old"]) * mask).sum(1))
    loss = (RLOOTrainer if cfg.loss_type == "rloo" else GRPOTrainer)._compute_loss(stub, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), metrics


def _ftjax(cfg: GrpoLoss, packed, halves=False):
    """(loss, d loss / d logps [ROWS, ROW_LEN], metrics): Σ over micro-batches (row halves) / global normalizer."""
    mask, seg = jnp.asarray(packed["mask"]), jnp.asarray(packed["seg"])
    parts = [slice(0, 1), slice(1, 2)] if halves else [slice(0, ROWS)]

    def loss(logps):
        total = sum(grpo_loss.loss_sum(cfg, logps[p], packed["old"][p], packed["adv"][p], mask[p], seg[p],
                                       packed["ref"][p]) for p in parts)
        return total / grpo_loss.normalizer(cfg, mask, seg)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(packed["logps"]))
    sums = grpo_loss.metric_sums(cfg, packed["logps"], packed["old"], packed["adv"], mask, seg, packed["ref"],
                                 packed["entropy"])
    counts = ("tokens", "completions")
    return float(value), np.asarray(grad), {k: float(v / sums[grpo_loss.denominator(cfg, k)])
                                            for k, v in sums.items() if k not in counts}


CONFIGS = [GrpoLoss(t, epsilon=0.2, epsilon_high=h, beta=b, max_completion_length=MAX_LEN)
           for t in ("grpo", "dr_grpo", "dapo", "bnpo") for h, b in ((None, 0.0), (0.28, 0.04))]
CONFIGS += [GrpoLoss("cispo", epsilon_high=h, beta=b, max_completion_length=MAX_LEN)
            for h, b in ((1.1, 0.0), (5.0, 0.04))]
CONFIGS += [GrpoLoss("rloo", epsilon=0.2, epsilon_high=h, max_completion_length=MAX_LEN) for h in (None, 0.28)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_type}-eh{c.epsilon_high}-b{c.beta}")
@pytest.mark.parametrize("halves", [False, True], ids=["one", "micro"])
def test_loss_gradient_and_metrics_match_trl(cfg, halves):
    padded, adv, packed, places = _case(0, cfg.beta)
    want, want_grad, want_metrics = _trl(cfg, padded, adv)
    got, got_grad, got_metrics = _ftjax(cfg, packed, halves)
    assert got == pytest.approx(want, abs=TOL, rel=TOL)
    for i, ((row, start), length) in enumerate(zip(places, COMPLETIONS)):
        np.testing.assert_allclose(got_grad[row, start:start + length], want_grad[i, :length], atol=TOL, rtol=TOL)
    assert np.all(got_grad[packed["mask"] == 0] == 0)  # prompts and padding get no gradient
    names = [k for k in want_metrics if k in METRICS or k == "cispo_clip_ratio"]
    assert set(names) == set(got_metrics)
    if cfg.loss_type != "cispo":
        assert want_metrics["clip_ratio/region_mean"] > 0  # the case does clip
    for k in names:
        assert got_metrics[k] == pytest.approx(want_metrics[k], abs=TOL, rel=TOL), k


@pytest.mark.parametrize("loss_type", grpo_loss.LOSS_TYPES)
def test_first_step_is_the_policy_gradient(loss_type):
    """β = 0, μ = 1: old = current log-probs, so the ratio is exactly 1 and d loss / d logp = −A·w / normalizer
    (w: 1/completion length for grpo, 1 otherwise)."""
    cfg = GrpoLoss(loss_type, epsilon_high=5.0 if loss_type == "cispo" else None, max_completion_length=MAX_LEN)
    _, _, packed, places = _case(1, 0.0, same_old=True)
    mask, seg = jnp.asarray(packed["mask"]), jnp.asarray(packed["seg"])
    if loss_type == "rloo":
        _, ratio = grpo_loss.sequence_loss(cfg, packed["logps"], packed["old"], packed["adv"], mask, seg)
    else:
        _, ratio = grpo_loss.per_token_loss(cfg, packed["logps"], packed["old"], packed["adv"])
    assert np.all(np.asarray(ratio) == 1.0)
    grad = np.asarray(jax.grad(lambda lp: grpo_loss.loss_sum(cfg, lp, packed["old"], packed["adv"], mask, seg)
                               / grpo_loss.normalizer(cfg, mask, seg))(jnp.asarray(packed["logps"])))
    lengths = np.zeros((ROWS, ROW_LEN), np.float32)
    for (row, start), length in zip(places, COMPLETIONS):
        lengths[row, start:start + length] = length
    n, tokens = len(COMPLETIONS), sum(COMPLETIONS)
    per_type = {"grpo": (np.where(lengths > 0, 1 / np.maximum(lengths, 1), 0), n),
                "dr_grpo": (packed["mask"], n * MAX_LEN), "rloo": (packed["mask"], n)}  # rloo: Σ logp per completion
    weights, norm = per_type.get(loss_type, (packed["mask"], tokens))
    np.testing.assert_allclose(grad, -packed["adv"] * weights / norm, atol=TOL, rtol=TOL)


def test_counts_of_packed_rows():
    places, seg, mask = _packing()
    assert float(grpo_loss.completion_count(jnp.asarray(mask), jnp.asarray(seg))) == len(COMPLETIONS)
    counts = np.asarray(grpo_loss.segment_token_counts(jnp.asarray(mask), jnp.asarray(seg)))
    for (row, start), length in zip(places, COMPLETIONS):
        assert np.all(counts[row, start:start + length] == length)


def test_unknown_loss_type_is_one_line():
    with pytest.raises(ConfigError,
                       match=r"^rl.loss_type='gspo': choose one of grpo, dr_grpo, dapo, bnpo, cispo, rloo$"):
        GrpoLoss("gspo")
