"""GRPO-family per-token loss over packed rows, as TRL 1.16's `GRPOTrainer._compute_loss` defines each `loss_type`.

Rows are packed: `[B, T]` per-token log-probs of each position's target, a completion mask (1 on the completion
tokens a loss counts, 0 on prompts and padding) and segment ids (one prompt + completion a segment). Each loss type
is written as Σ per-token weight · value over a micro-batch plus a normalizer of the global batch, so a train step
that adds micro-batches and divides once gets TRL's loss on the whole batch (TRL's grpo, dr_grpo and bnpo normalize
each micro-batch, bnpo on each process, and average those: with one micro-batch on one process the two agree; with
several, this is the mean over the global batch whatever each micro-batch holds). `rloo` is `RLOOTrainer`'s loss: one importance
ratio per completion (its summed log-probs), clipped, averaged over completions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "rloo")  # rloo: RLOOTrainer's sequence-level loss
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@dataclasses.dataclass(frozen=True)
class GrpoLoss:
    """A loss variant and its knobs, named as TRL's `GRPOConfig` names them (`epsilon_high=None`: `epsilon`)."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0  # weight of the k3 KL to the reference; 0: no reference pass
    max_completion_length: int = 512  # dr_grpo's constant normalizer per completion

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"rl.loss_type={self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")

    @property
    def high(self) -> float:
        """The upper clip: ratio ≤ 1 + high (cispo: ratio ≤ high, its own bound)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token KL(π ‖ π_ref) estimate exp(r) − r − 1, r = ref − logp (Schulman's k3: ≥ 0, unbiased)."""
    delta = ref_logps - logps
    return jnp.exp(delta) - delta - 1.0


def per_token_loss(cfg: GrpoLoss, logps, old_logps, advantages, ref_logps=None):
    """(per-token loss, importance ratio π/π_old) before masking; `advantages` per token (each completion's own)."""
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    if cfg.loss_type == "cispo":
        loss = -jax.lax.stop_gradient(jnp.minimum(ratio, cfg.high)) * advantages * logps
    else:
        clipped = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.high)
        loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    if cfg.beta != 0.0:
        loss = loss + cfg.beta * k3_kl(logps, ref_logps)
    return loss, ratio


def segment_totals(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T]: at each position, the sum of `values` over its segment (of its row)."""
    b, t = values.shape
    ids = (jnp.arange(b)[:, None] * t + segment_ids).reshape(-1)
    sums = jax.ops.segment_sum(values.reshape(-1).astype(jnp.float32), ids, num_segments=b * t)
    return sums[ids].reshape(b, t)


def segment_token_counts(mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T]: the number of completion tokens in each position's segment (of its row)."""
    return segment_totals(mask, segment_ids)


def sequence_loss(cfg: GrpoLoss, logps, old_logps, advantages, mask, segment_ids):
    """RLOO: per position, its completion's clipped loss, one ratio exp(Σ logp − Σ old logp) for the completion."""
    m = mask.astype(jnp.float32)
    ratio = jnp.exp(segment_totals((logps - jax.lax.stop_gradient(old_logps)) * m, segment_ids))
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.high)
    return -jnp.minimum(ratio * advantages, clipped * advantages), ratio


def completion_count(mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """How many completions the rows hold: the completion tokens that start one (first of a run in a segment)."""
    m = mask.astype(jnp.float32)
    prev_same = jnp.pad(m[:, :-1] * (segment_ids[:, :-1] == segment_ids[:, 1:]), ((0, 0), (1, 0)))
    return jnp.sum(m * (1.0 - prev_same))


def token_weights(cfg: GrpoLoss, mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Each token's share of the loss before the normalizer: grpo averages a completion's tokens first (1/length),
    rloo counts each completion's (shared) loss once (1/length); the other types weigh every completion token alike."""
    m = mask.astype(jnp.float32)
    if cfg.loss_type in ("grpo", "rloo"):
        return m / jnp.maximum(segment_token_counts(mask, segment_ids), 1.0)
    return m


def normalizer(cfg: GrpoLoss, mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """What the global batch's Σ weight·loss is divided by: completions (grpo), completions × max length (dr_grpo),
    completion tokens (bnpo, dapo, cispo); at least 1."""
    if cfg.loss_type in ("grpo", "rloo"):
        n = completion_count(mask, segment_ids)
    elif cfg.loss_type == "dr_grpo":
        n = completion_count(mask, segment_ids) * cfg.max_completion_length
    else:
        n = jnp.sum(mask.astype(jnp.float32))
    return jnp.maximum(n, 1.0)


def loss_sum(cfg: GrpoLoss, logps, old_logps, advantages, mask, segment_ids, ref_logps=None):
    """Σ token weight · per-token loss over a micro-batch (divide the global sum by `normalizer`)."""
    if cfg.loss_type == "rloo":  # its KL is in the reward (rloo_advantages), not in the loss
        loss, _ = sequence_loss(cfg, logps, old_logps, advantages, mask, segment_ids)
    else:
        loss, _ = per_token_loss(cfg, logps, old_logps, advantages, ref_logps)
    return jnp.sum(loss * token_weights(cfg, mask, segment_ids))


def metric_sums(cfg: GrpoLoss, logps, old_logps, advantages, mask, segment_ids, ref_logps=None, entropies=None
                ) -> dict:
    """Sums of what TRL logs as means, each over the global batch's `tokens` (its Σ mask) except rloo's clip ratios,
    over its `completions` (`denominator`): clip_ratio low/high/region (cispo: cispo_clip_ratio), kl when beta ≠ 0
    (not rloo: its KL is in the reward), entropy when given."""
    m = mask.astype(jnp.float32)
    out = {"tokens": jnp.sum(m), "completions": completion_count(mask, segment_ids)}
    if cfg.loss_type == "rloo":
        _, ratio = sequence_loss(cfg, logps, old_logps, advantages, mask, segment_ids)
        m = token_weights(cfg, mask, segment_ids)  # each completion once
    else:
        ratio = jnp.exp(logps - old_logps)
    if cfg.loss_type == "cispo":
        out["cispo_clip_ratio"] = jnp.sum(m * ((ratio > cfg.high) & (advantages > 0)))
    else:
        low = (ratio < 1.0 - cfg.epsilon) & (advantages < 0)
        high = (ratio > 1.0 + cfg.high) & (advantages > 0)
        for name, flag in zip(CLIP_METRICS, (low, high, low | high)):
            out[name] = jnp.sum(m * flag)
    m = mask.astype(jnp.float32)
    if cfg.beta != 0.0 and cfg.loss_type != "rloo":
        out["kl"] = jnp.sum(m * k3_kl(logps, ref_logps))
    if entropies is not None:
        out["entropy"] = jnp.sum(m * entropies)
    return out


def denominator(cfg: GrpoLoss, metric: str) -> str:
    """Which count of `metric_sums` a metric is divided by: `completions` for rloo's clip ratios, else `tokens`."""
    return "completions" if cfg.loss_type == "rloo" and metric in CLIP_METRICS else "tokens"
