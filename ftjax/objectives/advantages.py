"""Advantages from a batch's rewards, on the host (numpy), as TRL 1.16 computes them: GRPO's group-relative
advantage (`scale_rewards` group / batch / none), RLOO's leave-one-out baseline, and DAPO's dynamic sampling.

Rewards come as one array of P·G floats, the G completions of a prompt side by side (prompt-major), NaN where no
reward function scored a completion (its advantage is 0, and it is left out of its group's statistics).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import numpy as np

SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: A = (r − mean) / (std + 1e-4), so a group of equal rewards gets 0, not 0/0


@contextlib.contextmanager
def _quiet():
    """No warnings for an all-NaN group or a 0/0 (their NaN becomes a 0 advantage)."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """Bessel-corrected standard deviation over the non-NaN entries (TRL's `nanstd`; NaN with fewer than 2)."""
    count = np.sum(~np.isnan(x), axis=axis)
    with _quiet():
        var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=True)) ** 2, axis=axis)
        return np.where(count > 1, np.sqrt(var * count / (count - 1)), np.nan)


def _grouped(rewards: np.ndarray, group_size: int) -> np.ndarray:
    rewards = np.asarray(rewards, np.float32)
    if rewards.ndim != 1 or rewards.size % group_size:
        raise ValueError(f"{rewards.shape} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards, group_size: int, scale: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantages, std-is-zero flags) per completion: r − its group's mean, divided by the group's std
    (`group`), the whole batch's std (`batch`) or nothing (`none`), each std + 1e-4. The flags' mean is TRL's
    `frac_reward_zero_std`."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards={scale!r}: one of {SCALES}")
    grouped = _grouped(rewards, group_size)
    with _quiet():
        mean = np.nanmean(grouped, axis=1, keepdims=True)
    if scale == "batch":
        std = np.full_like(grouped, nanstd(grouped) if grouped.size > 1 else 0.0)
    elif group_size > 1:
        std = np.broadcast_to(nanstd(grouped, axis=1)[:, None], grouped.shape)
    else:
        std = np.zeros_like(grouped)
    adv = grouped - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    zero_std = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)
    return np.nan_to_num(adv, nan=0.0).reshape(-1), zero_std.reshape(-1)


def rloo_advantages(rewards, group_size: int, normalize: bool = False, kl=None, beta: float = 0.0) -> np.ndarray:
    """RLOO: r − the mean of the other completions of its prompt (`RLOOTrainer`), with the sequence KL
    Σ(old − ref) logps (`kl`, per completion) taken from the reward at weight `beta` first; `normalize`: then to
    mean 0, std 1 over the batch."""
    rewards = np.asarray(rewards, np.float32)
    if beta != 0.0:
        rewards = rewards - beta * np.asarray(kl, np.float32)
    grouped = _grouped(rewards, group_size)
    if group_size == 1:
        return np.zeros(grouped.size, np.float32)
    scorable = np.sum(~np.isnan(grouped), axis=1, keepdims=True)
    with _quiet():
        baseline = (np.nansum(grouped, axis=1, keepdims=True) - grouped) / (scorable - 1)
        adv = (grouped - baseline).reshape(-1)
        if normalize:
            adv = (adv - np.nanmean(adv)) / (nanstd(adv) + STD_EPS)
    return np.nan_to_num(adv, nan=0.0)


def informative(grouped_rewards: np.ndarray) -> np.ndarray:
    """Per group: whether its rewards differ (DAPO keeps only those; equal rewards give every completion A = 0)."""
    with _quiet():
        return np.nanmax(grouped_rewards, axis=1) > np.nanmin(grouped_rewards, axis=1)


def dynamic_sampling(draw: Callable[[], tuple[list, np.ndarray]], groups: int, max_draws: int
                     ) -> tuple[list, np.ndarray, int]:
    """DAPO's dynamic sampling: call `draw()` -> (groups' items, rewards [n, G]) until `groups` groups with unequal
    rewards are kept, in the order drawn. After `max_draws` draws it fills what is missing with the uninformative
    groups drawn first (zero advantage) rather than loop forever. Returns (items, rewards [groups, G], draws)."""
    kept, kept_rewards, spare, spare_rewards = [], [], [], []
    draws = 0
    while len(kept) < groups and draws < max_draws:
        items, rewards = draw()
        draws += 1
        rewards = np.asarray(rewards, np.float32)
        for item, row, useful in zip(items, rewards, informative(rewards)):
            (kept if useful else spare).append(item)
            (kept_rewards if useful else spare_rewards).append(row)
    missing = max(groups - len(kept), 0)
    items = (kept + spare[:missing])[:groups]
    rows = (kept_rewards + spare_rewards[:missing])[:groups]
    if len(items) < groups:
        raise ValueError(f"dynamic sampling drew {draws} batches and holds {len(items)} groups of {groups}")
    return items, np.stack(rows), draws

