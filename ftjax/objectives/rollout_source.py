"""GRPO's batch source: each rollout samples G completions for each of P prompts from the current weights
(`rollouts.sample`), scores them on the host, turns the rewards into advantages and packs the completions into
the step's rows; the same batch then serves `num_iterations` optimizer steps.

Determinism: the prompts of rollout r are positions [cursor, cursor + P) of an endless sequence of seeded
permutations of the train prompts (epoch e: `default_rng([seed, e])`), and its sampler seed is a pure function
of (seed, r, draw) (`sampler_seed`); the checkpoint keeps r, the cursor, and the batch in hand when a step stops
between the iterations of one rollout. A run killed and resumed therefore draws the same prompts and samples.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from typing import Any, Sequence

import jax
import numpy as np

from ftjax.data.prompts import Prompt
from ftjax.objectives.advantages import dynamic_sampling, group_advantages, nanstd, rloo_advantages
from ftjax.objectives.rewards import NamedReward, score_batch
from ftjax.objectives.rollout_rows import pack_rollouts
from ftjax.objectives.rollouts import Samples, sample


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a rollout batch is drawn (the run's `rl.*`, with what the tokenizer and data give)."""

    num_generations: int
    prompts_per_step: int
    max_new_tokens: int
    temperature: float
    top_p: float
    num_iterations: int
    baseline: str  # group | rloo
    scale_rewards: str
    dynamic_sampling: bool
    max_draws: int
    eos_ids: tuple[int, ...]
    pad_id: int
    chunk: int  # positions of logits at a time in the log-prob pass


@dataclasses.dataclass
class Group:
    """One prompt's G completions and their scores."""

    prompt: Prompt
    samples: Samples
    per_function: np.ndarray  # [G, F]
    total: np.ndarray  # [G]


def sampler_seed(seed: int, rollout: int, draw: int) -> int:
    """The generation seed of draw `draw` of rollout `rollout`: a pure function of the run's seed and both."""
    return int(np.random.default_rng([seed % 2**32, rollout, draw, 0x67727030]).integers(2**31 - 1))


def prompt_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n train prompts in epoch `epoch` (a pure function of the seed and the epoch)."""
    return np.random.default_rng([seed % 2**32, epoch, 0x70726F6D]).permutation(n)


def _encode(batch: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, **batch)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as f:
        return {k: f[k] for k in f.files}


class RolloutBatches:
    """The steps' batches sampled from the policy (a `BatchSource`)."""

    def __init__(self, prompts: Sequence[Prompt], rewards: list[NamedReward], sampling: Sampling, graphdef: Any,
                 frozen: Any, tokenizer: Any, rows: int, seq_len: int, seed: int, sharding: Any):
        if not prompts:
            raise ValueError("no train prompts")
        self.prompts, self.rewards, self.s = list(prompts), rewards, sampling
        self.graphdef, self.frozen, self.tokenizer = graphdef, frozen, tokenizer
        self.rows, self.seq_len, self.seed, self.sharding = rows, seq_len, seed, sharding
        self.rollout, self.cursor, self.served = 0, 0, 0
        self.pending: dict[str, np.ndarray] | None = None  # host rows of the batch in hand
        self.device_batch: dict | None = None
        self._metrics: dict[str, float] = {}
        self._returned = 0.0
        self._tokens = 0

    # --- the BatchSource protocol ---------------------------------------------------------------------------------
    def next(self, trainable: Any) -> dict:
        if self.pending is None or self.served >= self.s.num_iterations:
            self.pending, self._metrics = self._rollout(trainable)
            self.device_batch, self.served = None, 0
            self.rollout += 1
        else:
            self._metrics = {}
        if self.device_batch is None:
            self.device_batch = self._global(self.pending)
        self.served += 1
        self._tokens = int(np.sum(self.pending["segment_ids"] > 0))
        self._returned = time.perf_counter()
        return self.device_batch

    def metrics(self, trainable: Any) -> dict[str, float]:
        """This step's rollout figures, and its training time: from the batch handed over to the step's weights
        ready (the first step's includes compiling the step)."""
        jax.block_until_ready(trainable)
        train_s = time.perf_counter() - self._returned
        return {**self._metrics, "train_s": train_s, "train_tokens_per_s": self._tokens / max(train_s, 1e-9)}

    def state(self) -> dict:
        out = {"rollout": self.rollout, "cursor": self.cursor, "served": self.served}
        if self.pending is not None and self.served < self.s.num_iterations:
            out["pending"] = _encode(self.pending)
        return out

    def restore(self, state: dict) -> None:
        self.rollout, self.cursor, self.served = int(state["rollout"]), int(state["cursor"]), int(state["served"])
        self.pending = _decode(state["pending"]) if "pending" in state else None
        self.device_batch = None

    def close(self) -> None:
        """Nothing runs ahead: each rollout needs the weights of the step before it."""

    # --- one rollout ----------------------------------------------------------------------------------------------
    def _take(self, n: int) -> list[Prompt]:
        out, orders = [], {}  # epoch -> its permutation, drawn once per call
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.prompts))
            if epoch not in orders:
                orders[epoch] = prompt_order(len(self.prompts), self.seed, epoch)
            out.append(self.prompts[int(orders[epoch][pos])])
            self.cursor += 1
        return out

    def _draw(self, trainable: Any, draw: int, clock: dict) -> tuple[list[Group], np.ndarray]:
        s, g = self.s, self.s.num_generations
        prompts = self._take(s.prompts_per_step)
        start = time.perf_counter()
        samples = sample(self.graphdef, trainable, self.frozen, [p.tokens for p in prompts for _ in range(g)],
                         seed=sampler_seed(self.seed, self.rollout, draw), max_new_tokens=s.max_new_tokens,
                         eos_ids=s.eos_ids, pad_id=s.pad_id, temperature=s.temperature, top_p=s.top_p,
                         chunk=s.chunk)
        clock["generation_s"] += time.perf_counter() - start
        texts = [self.tokenizer.decode([t for t in c if t not in s.eos_ids], skip_special_tokens=True)
                 for c in samples.completions]
        scores = score_batch(self.rewards, [p.text for p in prompts for _ in range(g)], texts,
                             [p.example for p in prompts for _ in range(g)])
        clock["scoring_s"] += scores.seconds
        groups = []
        for i, p in enumerate(prompts):
            part = slice(i * g, (i + 1) * g)
            groups.append(Group(p, Samples(samples.prompts[part], samples.completions[part], samples.truncated[part],
                                           samples.logps[part], samples.entropies[part]),
                                scores.per_function[part], scores.total[part]))
        return groups, scores.total.reshape(len(prompts), g)

    def _rollout(self, trainable: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        s, g = self.s, self.s.num_generations
        clock = {"generation_s": 0.0, "scoring_s": 0.0}
        draws = [0]

        def draw():
            out = self._draw(trainable, draws[0], clock)
            draws[0] += 1
            return out

        if s.dynamic_sampling:
            groups, _, _ = dynamic_sampling(draw, s.prompts_per_step, s.max_draws)
        else:
            groups, _ = draw()
        total = np.concatenate([grp.total for grp in groups])
        group_adv, zero_std = group_advantages(total, g, s.scale_rewards)
        adv = rloo_advantages(total, g) if s.baseline == "rloo" else group_adv
        prompts = [list(grp.prompt.tokens) for grp in groups for _ in range(g)]
        completions = [c for grp in groups for c in grp.samples.completions]
        logps = [x for grp in groups for x in grp.samples.logps]
        per_token = {"old_logps": logps} if s.num_iterations > 1 else None
        try:
            rows = pack_rollouts(prompts, completions, adv, self.seq_len, rows=self.rows, per_token=per_token)
        except ValueError as e:
            raise ValueError(f"rollout batch: {e} (raise train.batch_size or data.seq_len, or lower "
                             f"rl.prompts_per_step x rl.num_generations)") from None
        lengths = np.array([len(c) for c in completions], np.float64)
        entropies = np.concatenate([x for grp in groups for x in grp.samples.entropies])
        per_function = np.concatenate([grp.per_function for grp in groups])
        metrics = {"reward": float(np.nanmean(total)), "reward_std": _std(total),
                   **{f"reward/{r.name}": float(np.nanmean(per_function[:, i])) for i, r in enumerate(self.rewards)},
                   "completion_length": float(lengths.mean()),
                   "completion_truncated": float(np.mean([t for grp in groups for t in grp.samples.truncated])),
                   "entropy": float(entropies.mean()), "frac_reward_zero_std": float(np.mean(zero_std)),
                   **clock, "generation_tokens_per_s": float(lengths.sum()) / max(clock["generation_s"], 1e-9)}
        if s.dynamic_sampling:
            metrics["draws"] = float(draws[0])
        return rows, metrics

    def _global(self, rows: dict[str, np.ndarray]) -> dict:
        """Host rows (the same on every process) as global arrays split over the batch axes."""
        if self.sharding is None:
            return dict(rows)
        return {k: jax.make_array_from_callback(v.shape, self.sharding, lambda idx, v=v: v[idx])
                for k, v in rows.items()}


def _std(x: np.ndarray) -> float:
    """The Bessel-corrected std over the batch (TRL's `reward_std`)."""
    return float(nanstd(x))
