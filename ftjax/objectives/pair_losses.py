"""Preference losses (DPO, robust DPO, IPO, ORPO, SimPO) from per-reply log-probs, as TRL 1.16 defines them.

Inputs are, per pair, the summed log-prob of the chosen and the rejected reply and their token counts
(`ftjax.objectives.reply_logps` computes them from hidden states). Each function returns per-pair losses and
rewards; `pair_sums` turns them into sums over the valid pairs of a micro-batch, so micro-batches combine into
one mean over the pairs of the global batch, as TRL takes `per_sequence_loss.mean()`.

- DPO (`loss_type="sigmoid"`) and robust DPO (`"robust"`, label smoothing ε in [0, 0.5)): summed log-probs,
  Δ = (π_c − ref_c) − (π_r − ref_r), loss (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε); ε = 0 is plain DPO.
- IPO: the log-ratios averaged over each reply's tokens, loss (Δ_avg − 1/(2β))².
- ORPO (TRL's `odds_ratio_loss`): average log-probs p, log-odds (p_c − p_r) − (log(1−e^p_c) − log(1−e^p_r)),
  loss −β·logσ(log-odds); its NLL term on the chosen reply is a cross-entropy term the step adds.
- SimPO (CPO with `loss_type="simpo"`): average log-probs, z = (p_c − p_r) − γ/β,
  loss −(1−ε)·logσ(βz) − ε·logσ(−βz).

Rewards (TRL's metrics) are β·(log-ratio) for DPO / IPO (summed, as TRL logs them even for IPO) and β·(average
log-prob) for ORPO / SimPO; `logps/*` are the log-probs the method uses (summed for DPO / IPO, averaged for
ORPO / SimPO).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
WITH_REFERENCE = ("dpo", "ipo")  # ORPO and SimPO need no reference model
LENGTH_NORMALIZED = ("ipo", "orpo", "simpo")  # preference accuracy compares average log-probs for these
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """`objective` and its hyper-parameters (`pref.beta`, `pref.label_smoothing`, `pref.gamma`)."""

    objective: str
    beta: float = 0.1
    label_smoothing: float = 0.0  # robust DPO (and SimPO's conservative form, as TRL's CPO)
    gamma: float = 0.5  # SimPO's target reward margin

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r} is not a preference objective ({', '.join(OBJECTIVES)})")
        if not self.beta > 0:
            raise ConfigError(f"pref.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"pref.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.objective not in ("dpo", "simpo"):
            raise ConfigError(f"pref.label_smoothing applies to dpo (robust DPO) and simpo, not {self.objective}")

    @property
    def needs_reference(self) -> bool:
        return self.objective in WITH_REFERENCE


class ReplyLogps(NamedTuple):
    """Per pair [P]: summed log-probs of the chosen and rejected replies, and their token counts."""

    chosen: jax.Array
    rejected: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array

    def averaged(self) -> tuple[jax.Array, jax.Array]:
        """Average log-prob per reply token (a reply of no tokens counts as one, as TRL clamps)."""
        return (self.chosen / jnp.maximum(self.chosen_tokens, 1.0),
                self.rejected / jnp.maximum(self.rejected_tokens, 1.0))


class PairLosses(NamedTuple):
    """Per pair [P]: the loss, TRL's rewards, and the log-probs logged as logps/chosen and logps/rejected."""

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    chosen_logps: jax.Array
    rejected_logps: jax.Array


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo_losses(policy: ReplyLogps, reference: ReplyLogps, beta: float, label_smoothing: float = 0.0) -> PairLosses:
    """DPO (ε = 0) or robust DPO (ε > 0, unbiased under label noise ε) on summed log-probs."""
    chosen_ratio = policy.chosen - jax.lax.stop_gradient(reference.chosen)
    rejected_ratio = policy.rejected - jax.lax.stop_gradient(reference.rejected)
    z = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return PairLosses(losses, beta * chosen_ratio, beta * rejected_ratio, policy.chosen, policy.rejected)


def ipo_losses(policy: ReplyLogps, reference: ReplyLogps, beta: float) -> PairLosses:
    """IPO on per-token-averaged log-ratios; rewards stay summed, as TRL logs them."""
    chosen_ratio = policy.chosen - jax.lax.stop_gradient(reference.chosen)
    rejected_ratio = policy.rejected - jax.lax.stop_gradient(reference.rejected)
    delta = (chosen_ratio / jnp.maximum(policy.chosen_tokens, 1.0)
             - rejected_ratio / jnp.maximum(policy.rejected_tokens, 1.0))
    losses = jnp.square(delta - 1.0 / (2.0 * beta))
    return PairLosses(losses, beta * chosen_ratio, beta * rejected_ratio, policy.chosen, policy.rejected)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − eˣ) for x < 0, branching at −ln 2 as TRL does (no cancellation on either side)."""
    safe = jnp.minimum(x, -1e-30)  # x = 0 (a reply of probability 1) would give log 0 on both branches
    return jnp.where(safe < -0.6931471805599453, jnp.log1p(-jnp.exp(safe)), jnp.log(-jnp.expm1(safe)))


def orpo_losses(policy: ReplyLogps, beta: float) -> PairLosses:
    """ORPO's odds-ratio part on average log-probs (the chosen reply's NLL is added by the step)."""
    chosen, rejected = policy.averaged()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -beta * jax.nn.log_sigmoid(log_odds)
    return PairLosses(losses, beta * chosen, beta * rejected, chosen, rejected)


def simpo_losses(policy: ReplyLogps, beta: float, gamma: float, label_smoothing: float = 0.0) -> PairLosses:
    """SimPO: a margin γ on the difference of average log-probs, no reference."""
    chosen, rejected = policy.averaged()
    z = beta * ((chosen - rejected) - gamma / beta)
    return PairLosses(_smoothed_sigmoid(z, label_smoothing), beta * chosen, beta * rejected, chosen, rejected)


def pair_losses(cfg: PreferenceConfig, policy: ReplyLogps, reference: ReplyLogps | None = None) -> PairLosses:
    """The configured objective's per-pair losses (reference log-probs required for DPO / IPO)."""
    if cfg.needs_reference and reference is None:
        raise ConfigError(f"objective={cfg.objective} needs the reference model's log-probs")
    if cfg.objective == "dpo":
        return dpo_losses(policy, reference, cfg.beta, cfg.label_smoothing)
    if cfg.objective == "ipo":
        return ipo_losses(policy, reference, cfg.beta)
    if cfg.objective == "orpo":
        return orpo_losses(policy, cfg.beta)
    return simpo_losses(policy, cfg.beta, cfg.gamma, cfg.label_smoothing)


def pair_sums(out: PairLosses, valid: jax.Array) -> dict[str, jax.Array]:
    """Sums over the valid pairs of `loss` and of each TRL metric, plus `pairs` (their count): divide by the
    global batch's pair count (`metric_means`) for TRL's per-pair means."""
    v = valid.astype(jnp.float32)

    def total(x):
        return jnp.sum(jnp.where(valid, x.astype(jnp.float32), 0.0))  # NaN-free where padding pairs hold junk

    return {
        "loss": total(out.losses),
        "rewards/chosen": total(out.chosen_rewards),
        "rewards/rejected": total(out.rejected_rewards),
        "rewards/margins": total(out.chosen_rewards - out.rejected_rewards),
        "rewards/accuracies": total((out.chosen_rewards > out.rejected_rewards).astype(jnp.float32)),
        "logps/chosen": total(out.chosen_logps),
        "logps/rejected": total(out.rejected_logps),
        "pairs": jnp.sum(v),
    }


def metric_means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-pair means of `pair_sums` output (summed over micro-batches first); no pairs gives zeros."""
    n = jnp.maximum(sums["pairs"], 1.0)
    return {k: sums[k] / n for k in ("loss",) + METRICS}


def preference_accuracy(cfg: PreferenceConfig, policy: ReplyLogps) -> jax.Array:
    """Per pair: 1 where the chosen reply's log-prob exceeds the rejected one's (averaged over reply tokens for
    IPO / SimPO / ORPO, summed for DPO), the same definition for the base and the tuned model."""
    if cfg.objective in LENGTH_NORMALIZED:
        chosen, rejected = policy.averaged()
    else:
        chosen, rejected = policy.chosen, policy.rejected
    return (chosen > rejected).astype(jnp.float32)
