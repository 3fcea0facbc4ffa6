"""The GRPO-family loss as a batch term of the train step: per-token log-probs of the packed completions read from
the step's own forward pass (and the reference pass when beta > 0), at the sampling temperature, then
`grpo_loss.loss_sum` over the micro-batch and its normalizer over the global batch.

With one optimizer step per rollout batch (rl.num_iterations = 1) the old policy is the current one, detached, so
the importance ratio is exactly 1 (TRL does the same); with more, it is the batch's `old_logps`, read when the
rollouts were sampled. Logged: `clip_ratio` (and its low / high parts) and, with beta > 0, `kl`, token means over
the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError
from ftjax.objectives import grpo_loss
from ftjax.objectives.grpo_loss import GrpoLoss
from ftjax.objectives.reply_logps import token_logps
from ftjax.objectives.rollouts import scaled_hidden
from ftjax.objectives.terms import BatchTerm, Forward

RENAMED = {"clip_ratio/region_mean": "clip_ratio"}  # the name for TRL's region mean


def metric_names(cfg: GrpoLoss) -> tuple[str, ...]:
    """What the term logs for this loss type."""
    names = ("cispo_clip_ratio",) if cfg.loss_type == "cispo" else tuple(RENAMED.get(n, n) for n in
                                                                          grpo_loss.CLIP_METRICS)
    return names + (("kl",) if cfg.beta != 0.0 and cfg.loss_type != "rloo" else ())


def policy_logps(f: Forward, temperature: float, chunk: int) -> jax.Array:
    """log p(target) per position of a forward pass's model at `temperature`."""
    if not f.model.head_is_linear():
        raise ConfigError(f"objective=grpo reads the head as one linear; {f.model.config.model_type}'s final-logit "
                          "soft-cap is not supported there")
    w, vocab_major = f.model.head_weight()
    return token_logps(scaled_hidden(f.hidden, w, temperature), w, f.batch["targets"], chunk, vocab_major=vocab_major)


def grpo_term(cfg: GrpoLoss, temperature: float, chunk: int, reads_old: bool) -> BatchTerm:
    """The term `loss`: Σ token weight · GRPO loss over the micro-batch (rows from `rollout_rows.pack_rollouts`)."""
    reads_reference = cfg.beta != 0.0 and cfg.loss_type != "rloo"
    names = metric_names(cfg)

    def fn(f: Forward):
        b = f.batch
        logps = policy_logps(f, temperature, chunk)
        old = b["old_logps"] if reads_old else jax.lax.stop_gradient(logps)
        ref = jax.lax.stop_gradient(policy_logps(f.reference, temperature, chunk)) if reads_reference else None
        mask, segments = b["loss_weights"], b["segment_ids"]
        total = grpo_loss.loss_sum(cfg, logps, old, b["advantages"], mask, segments, ref)
        sums = grpo_loss.metric_sums(cfg, jax.lax.stop_gradient(logps), old, b["advantages"], mask, segments, ref)
        sums = {RENAMED.get(k, k): v for k, v in sums.items()}
        return total, {k: sums[k] for k in names}

    def completion_tokens(batch: dict) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)

    return BatchTerm("loss", fn, reads_reference=reads_reference, metrics=names,
                     normalizer=lambda batch: grpo_loss.normalizer(cfg, batch["loss_weights"], batch["segment_ids"]),
                     metric_normalizer=completion_tokens)
