"""Scoring a generated reply against the reference reply: `exact`, `json_valid`, `contains`, `regex`, task hooks.

`eval.metric` is a comma-separated list of scorer names (declared in `ftjax.scorer_names`, registered here); each scorer returns one or more named scores in
[0, 1] per example, averaged over the eval split. Names:

- `exact`: the reply equals the reference after stripping surrounding whitespace.
- `json_valid`: the reply holds a JSON object (the first `{...}` that parses).
- `contains`: the reference occurs in the reply (case-insensitive, whitespace collapsed).
- `regex`: the reference is a regular expression that must match the whole (stripped) reply;
  `regex:PATTERN` instead checks the reply against a fixed PATTERN (re.search). A fixed pattern takes
  the rest of the string, so it must come last in the list (it may contain commas).
- a task name from `ftjax.scorer_names.TASKS` (e.g. `person_json`): the task's own `score(reply, expected)`, whose
  keys (e.g. `exact` on the parsed JSON, `json_valid`) become the metric names.
"""

from __future__ import annotations

import re

from ftjax import scorer_names
from ftjax.scorer_names import FIXED_REGEX, Scorer, fixed_pattern, registered, split_metrics
from ftjax.tasks import person_json

__all__ = ["contains", "contains_answer", "exact", "json_valid", "make_scorer", "metric_names", "regex",
           "split_metrics"]


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


for _name, _scorer in (("exact", lambda r, e: {"exact": exact(r, e)}),
                      ("json_valid", lambda r, e: {"json_valid": json_valid(r, e)}),
                      ("contains", lambda r, e: {"contains": contains(r, e)}),
                      ("regex", lambda r, e: {"regex": regex(r, e)}),
                      ("person_json", person_json.score)):
    scorer_names.register(_name, _scorer)


def _one(name: str) -> Scorer:
    if name.startswith(FIXED_REGEX):
        compiled = fixed_pattern(name)
        return lambda r, e: {"regex": float(compiled.search(r) is not None)}
    return registered(name)


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
