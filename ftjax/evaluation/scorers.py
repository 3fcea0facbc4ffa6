"""Scoring a generated reply against the reference reply: `exact`, `json_valid`, `contains`, `regex`, task hooks.

`eval.metric` is a comma-separated list of scorer names; each scorer returns one or more named scores in
[0, 1] per example, averaged over the eval split. Names:

- `exact`: the reply equals the reference after stripping surrounding whitespace.
- `json_valid`: the reply holds a JSON object (the first `{...}` that parses).
- `contains`: the reference occurs in the reply (case-insensitive, whitespace collapsed).
- `regex`: the reference is a regular expression that must match the whole (stripped) reply;
  `regex:PATTERN` instead checks the reply against a fixed PATTERN (re.search). A fixed pattern takes
  the rest of the string, so it must come last in the list (it may contain commas).
- a task name from `TASK_SCORERS` (e.g. `person_json`): the task's own `score(reply, expected)`, whose
  keys (e.g. `exact` on the parsed JSON, `json_valid`) become the metric names.
"""

from __future__ import annotations

import re
from typing import Callable

from ftjax.errors import ConfigError
from ftjax.tasks import person_json

Scorer = Callable[[str, str], dict[str, float]]


def _normalize(s: str) -> str:
    return " ".join(s.split()).casefold()


def exact(reply: str, expected: str) -> float:
    """1.0 when the reply is the reference (surrounding whitespace ignored)."""
    return float(reply.strip() == expected.strip())


def json_valid(reply: str, expected: str = "") -> float:
    """1.0 when the reply holds a JSON object (models often wrap JSON in prose or code fences)."""
    return float(person_json.parse_reply(reply) is not None)


def contains(reply: str, expected: str) -> float:
    """1.0 when the reference occurs in the reply, ignoring case and runs of whitespace (short QA answers)."""
    return float(_normalize(expected) in _normalize(reply))


def regex(reply: str, pattern: str) -> float:
    """1.0 when `pattern` matches the whole stripped reply; a bad pattern scores 0, never crashes an eval."""
    try:
        return float(re.fullmatch(pattern, reply.strip(), flags=re.DOTALL) is not None)
    except re.error:
        return 0.0


# Task-specific scorers: name -> score(reply, expected) -> {metric: value}.
TASK_SCORERS: dict[str, Scorer] = {"person_json": person_json.score}
GENERIC = ("exact", "json_valid", "contains", "regex")


def _one(name: str) -> Scorer:
    if name in TASK_SCORERS:
        return TASK_SCORERS[name]
    if name == "exact":
        return lambda r, e: {"exact": exact(r, e)}
    if name == "json_valid":
        return lambda r, e: {"json_valid": json_valid(r, e)}
    if name == "contains":
        return lambda r, e: {"contains": contains(r, e)}
    if name == "regex":
        return lambda r, e: {"regex": regex(r, e)}
    if name.startswith("regex:"):
        pattern = name[len("regex:"):]
        try:
            compiled = re.compile(pattern, flags=re.DOTALL)
        except re.error as err:
            raise ConfigError(f"eval.metric: bad regular expression {pattern!r} ({err})") from None
        return lambda r, e: {"regex": float(compiled.search(r) is not None)}
    choices = ", ".join(GENERIC + ("regex:PATTERN",) + tuple(TASK_SCORERS))
    raise ConfigError(f"eval.metric: unknown metric {name!r} (choose from {choices})")


def split_metrics(metric: str) -> list[str]:
    """`"exact,json_valid,regex:a,b"` -> ["exact", "json_valid", "regex:a,b"] (a fixed regex takes the rest)."""
    names, rest = [], metric.strip()
    while rest:
        if rest.startswith("regex:"):
            names.append(rest)
            break
        head, _, rest = rest.partition(",")
        rest = rest.strip()
        if head.strip():
            names.append(head.strip())
    if not names:
        raise ConfigError("eval.metric is empty; name at least one of exact, json_valid, contains, regex")
    return names


def make_scorer(metric: str) -> Scorer:
    """One scorer for the whole `eval.metric` list; later names win where keys collide."""
    scorers = [_one(name) for name in split_metrics(metric)]

    def score(reply: str, expected: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in scorers:
            out.update(s(reply, expected))
        return out

    return score


def metric_names(metric: str) -> list[str]:
    """The score names `eval.metric` produces (the keys of `task.<which>`), found by scoring a dummy pair."""
    return list(make_scorer(metric)("", "{}"))


def contains_answer(reply: str, answer: str) -> float:
    """QA accuracy: one of the `|`-separated answers occurs in the reply as whole words (case-insensitive),
    so "0" does not match "100" and "Paris" matches "It is Paris."."""
    text = _normalize(reply)
    for alt in (a.strip() for a in answer.split("|")):
        if alt and re.search(rf"(?<!\w){re.escape(_normalize(alt))}(?!\w)", text):
            return 1.0
    return 0.0
