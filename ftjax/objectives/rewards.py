"""Rewards for RL from the model's own samples: Python functions `(prompt, completion, example) -> float`, named in
the config as `rl.rewards=json_fields,json_format=0.2` (a bundled name or `package.module:function`, each with an
optional weight), and the host-side runner that scores a batch, timed apart from generation and training.

A reward may return None for a completion it does not judge (NaN: left out of its group's statistics, as TRL).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import re
import time
from typing import Any, Callable

import numpy as np

from ftjax.errors import ConfigError, FtjaxError
from ftjax.objectives.advantages import nanstd
from ftjax.tasks import person_json

Reward = Callable[[str, str, dict], Any]
LENGTH_MAX, LENGTH_CACHE = 256, 64  # length_penalty: characters allowed, and the band before it where it ramps


class RewardError(FtjaxError):
    """A reward function raised or returned something that is not a number (the message names both)."""


def reference(example: dict) -> str:
    """The record's expected reply: its `answer` field, else the final assistant turn of its `messages`."""
    if "answer" in example:
        answer = example["answer"]
        return answer if isinstance(answer, str) else json.dumps(answer)
    turns = [m for m in example.get("messages", ()) if m.get("role") == "assistant"]
    if not turns:
        raise KeyError("the record has no `answer` field and no assistant turn to compare with")
    return turns[-1]["content"]


def json_fields(prompt: str, completion: str, example: dict) -> float:
    """The demo task's field-by-field match: the share of its keys (name, age, job, city) whose value in the
    completion's first JSON object equals the reference's (0 without a JSON object)."""
    got, want = person_json.parse_reply(completion), json.loads(reference(example))
    if got is None:
        return 0.0
    return sum(got.get(k) == want.get(k) for k in person_json.KEYS) / len(person_json.KEYS)


def json_format(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the completion holds a JSON object (the demo task's `json_valid`)."""
    return float(person_json.parse_reply(completion) is not None)


def answer_exact(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the completion is the record's `answer` (surrounding whitespace ignored)."""
    return float(completion.strip() == str(example["answer"]).strip())


def regex(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the record's `pattern` (a regular expression) matches the whole stripped completion."""
    return float(re.fullmatch(example["pattern"], completion.strip(), flags=re.DOTALL) is not None)


def length_penalty(prompt: str, completion: str, example: dict) -> float:
    """DAPO's soft overlong penalty over characters: 0 up to LENGTH_MAX − LENGTH_CACHE, then linearly down to −1
    at LENGTH_MAX, −1 beyond."""
    over = len(completion) - (LENGTH_MAX - LENGTH_CACHE)
    return -min(max(over, 0) / LENGTH_CACHE, 1.0)


BUNDLED: dict[str, Reward] = {f.__name__: f for f in (json_fields, json_format, answer_exact, regex,
                                                       length_penalty)}


@dataclasses.dataclass(frozen=True)
class NamedReward:
    """One entry of `rl.rewards`: its name as written, the function and its weight."""

    name: str
    fn: Reward
    weight: float = 1.0


def _import(name: str) -> Reward:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module: say which and why
        raise ConfigError(f"rl.rewards: cannot import {module_name!r} for {name!r} "
                          f"({type(e).__name__}: {e}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: {module_name!r} has no function {attr!r}")
    return fn


def _lookup(name: str) -> Reward:
    if ":" in name:
        return _import(name)
    if name not in BUNDLED:
        near = difflib.get_close_matches(name, list(BUNDLED), n=1, cutoff=0.0)
        raise ConfigError(f"rl.rewards: unknown reward {name!r}; did you mean {near[0]!r}? (bundled: "
                          f"{', '.join(BUNDLED)}; or package.module:function)")
    return BUNDLED[name]


def parse_rewards(spec: str) -> list[NamedReward]:
    """`"json_fields,json_format=0.2"` -> the rewards with their weights (1 where none is given)."""
    out: list[NamedReward] = []
    for item in (s.strip() for s in spec.split(",")):
        name, eq, weight = (p.strip() for p in item.rpartition("=")) if "=" in item else (item, "", "1")
        if not name:
            raise ConfigError(f"rl.rewards={spec!r}: an empty reward name (write name or name=weight, comma-separated)")
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"rl.rewards: the weight of {name!r} is {weight!r}, not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"rl.rewards: the weight of {name!r} is {weight!r}, not a finite number")
        if any(r.name == name for r in out):
            raise ConfigError(f"rl.rewards: {name!r} is named twice")
        out.append(NamedReward(name, _lookup(name), value))
    return out


@dataclasses.dataclass(frozen=True)
class Scores:
    """A batch's rewards: per function [N, F], the weighted total [N] (NaN where no function judged), seconds."""

    names: tuple[str, ...]
    per_function: np.ndarray
    total: np.ndarray
    seconds: float

    def metrics(self) -> dict[str, float]:
        """TRL's names: `reward`, `reward_std`, `rewards/<name>/mean` and `/std`, and `reward_seconds`."""
        out = {"reward": _nanmean(self.total), "reward_std": float(nanstd(self.total)),
               "reward_seconds": self.seconds}
        for i, name in enumerate(self.names):
            out[f"rewards/{name}/mean"] = _nanmean(self.per_function[:, i])
            out[f"rewards/{name}/std"] = float(nanstd(self.per_function[:, i]))
        return out


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else math.nan


def _short(text: str, n: int = 60) -> str:
    """The first `n` characters, quoted (newlines escaped: the message stays one line)."""
    return repr(text if len(text) <= n else text[:n] + "...")


def _one(reward: NamedReward, index: int, prompt: str, completion: str, example: dict) -> float:
    where = f"on example {index} (prompt {_short(prompt)}, completion {_short(completion)})"
    try:
        value = reward.fn(prompt, completion, example)
    except Exception as e:  # noqa: BLE001 - the user's function: one line naming it and the example
        raise RewardError(f"reward {reward.name} raised {type(e).__name__}: {' '.join(str(e).split())} {where}"
                          ) from None
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RewardError(f"reward {reward.name} returned {repr(value)[:60]}, not a number, {where}") from None


def score_batch(rewards: list[NamedReward], prompts: list[str], completions: list[str], examples: list[dict]
                ) -> Scores:
    """Every reward on every (prompt, completion, example); a reward that raises stops with one line."""
    start = time.perf_counter()
    table = np.array([[_one(r, i, p, c, e) for r in rewards]
                      for i, (p, c, e) in enumerate(zip(prompts, completions, examples, strict=True))],
                     np.float32).reshape(len(prompts), len(rewards))
    weights = np.array([r.weight for r in rewards], np.float32)
    unjudged = np.all(np.isnan(table), axis=1)
    total = np.where(unjudged, np.nan, np.nansum(table * weights, axis=1)).astype(np.float32)
    return Scores(tuple(r.name for r in rewards), table, total, time.perf_counter() - start)
