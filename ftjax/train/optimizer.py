"""Optax optimizers from config: AdamW / SGD+momentum / Adafactor / Lion, warmup + decay, clipping,
and a guard that skips (and counts) steps whose gradients are not finite."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ftjax.errors import ConfigError, FtjaxError

NO_DECAY_LEAVES = ("scale", "bias")  # RMSNorm scales and biases are not weight-decayed


class NonFiniteError(FtjaxError):
    """Too many consecutive steps had NaN/Inf gradients: the run is diverging."""


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The update rule and its learning-rate schedule (the step reports lr = schedule(applied steps))."""

    tx: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]


def make_schedule(name: str, lr: float, steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """Linear warmup (step 1 already trains at lr/warmup) then cosine, linear or constant to the end."""
    decay_steps = max(steps - warmup_steps, 1)
    if name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    elif name == "linear":
        main = optax.linear_schedule(lr, lr * min_lr_ratio, decay_steps)
    elif name == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"optim.schedule={name!r} is not one of cosine, linear, constant")
    if warmup_steps <= 0:
        return main
    if warmup_steps == 1:
        warm = optax.constant_schedule(lr)
    else:
        warm = optax.linear_schedule(lr / warmup_steps, lr, warmup_steps - 1)
    return optax.join_schedules([warm, main], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every parameter except norm scales and biases."""

    def keep(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        if name == "value" and len(path) > 1:  # a Variable's own leaf: look at the param's name
            last = path[-2]
            name = getattr(last, "key", getattr(last, "name", last))
        return str(name) not in NO_DECAY_LEAVES

    return jax.tree_util.tree_map_with_path(keep, params)


def base_optimizer(name: str, schedule, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, momentum: float = 0.9) -> optax.GradientTransformation:
    """The named update rule; decoupled weight decay (masked) for AdamW and Lion."""
    if name == "adamw":
        return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if name == "lion":
        return optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    if name == "sgd":
        return optax.sgd(schedule, momentum=momentum or None)
    if name == "adafactor":
        return optax.adafactor(schedule, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask)
    raise ConfigError(f"optim.name={name!r} is not one of adamw, sgd, adafactor, lion")


class GuardState(NamedTuple):
    """Counters of the non-finite guard around the optimizer state it protects."""

    applied: jax.Array  # updates applied so far (drives the schedule)
    skipped: jax.Array  # steps skipped in total
    consecutive: jax.Array  # current run of skipped steps
    longest: jax.Array  # longest run of skipped steps so far (checked on the host every log_every)
    inner: Any


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Like `optax.apply_if_finite`, but never gives up: a non-finite step leaves the inner state
    untouched and returns zero updates; counters say how often and how long in a row."""

    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return GuardState(zero, zero, zero, zero, inner.init(params))

    def update(grads, state, params=None):
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, new_inner = inner.update(grads, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner)
        consecutive = jnp.where(finite, 0, state.consecutive + 1)
        return updates, GuardState(state.applied + finite.astype(jnp.int32),
                                   state.skipped + (~finite).astype(jnp.int32), consecutive,
                                   jnp.maximum(state.longest, consecutive), new_inner)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim, steps: int) -> Optimizer:
    """From the `optim` config group (and train.steps): clip -> update rule, under the guard."""
    schedule = make_schedule(optim.schedule, optim.lr, steps, optim.warmup_steps, optim.min_lr_ratio)
    rule = base_optimizer(optim.name, schedule, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2,
                          eps=optim.eps, momentum=optim.momentum)
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    return Optimizer(skip_nonfinite(optax.chain(*parts, rule)), schedule)


def raise_if_diverged(metrics: dict, max_consecutive_skips: int) -> None:
    """Host-side stop rule, on fetched metrics: K non-finite steps in a row end the run."""
    longest = int(metrics["longest_skip_run"])
    if longest >= max_consecutive_skips:
        raise NonFiniteError(
            f"{longest} consecutive steps had NaN/Inf gradients (train.max_consecutive_skips="
            f"{max_consecutive_skips}); lower optim.lr or check the data")
