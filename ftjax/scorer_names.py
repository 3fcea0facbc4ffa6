"""The scorer names `eval.metric` may use: checked by config validation, implemented by ftjax.evaluation.scorers.

The names live here, below everything, so that validating a config imports no evaluation code; the
evaluation package registers one scorer per name (`register`) and looks them up (`registered`).
"""

from __future__ import annotations

import re
from typing import Callable

from ftjax.errors import ConfigError

Scorer = Callable[[str, str], dict[str, float]]

GENERIC = ("exact", "json_valid", "contains", "regex")
TASKS = ("person_json",)  # task scorers (ftjax.tasks): the task's own score(reply, expected)
NAMES = GENERIC + TASKS
FIXED_REGEX = "regex:"  # regex:PATTERN, a fixed pattern the reply must contain (re.search)

_SCORERS: dict[str, Scorer] = {}


def register(name: str, scorer: Scorer) -> None:
    """Register the scorer implementing a declared name (a name not in NAMES is a programming error)."""
    if name not in NAMES:
        raise ValueError(f"scorer {name!r} is not declared in ftjax.scorer_names.NAMES")
    _SCORERS[name] = scorer


def registered(name: str) -> Scorer:
    """The scorer registered for a declared name."""
    check_name(name)
    return _SCORERS[name]


def split_metrics(metric: str) -> list[str]:
    """`"exact,json_valid,regex:a,b"` -> ["exact", "json_valid", "regex:a,b"] (a fixed regex takes the rest)."""
    names, rest = [], metric.strip()
    while rest:
        if rest.startswith(FIXED_REGEX):
            names.append(rest)
            break
        head, _, rest = rest.partition(",")
        rest = rest.strip()
        if head.strip():
            names.append(head.strip())
    if not names:
        raise ConfigError("eval.metric is empty; name at least one of exact, json_valid, contains, regex")
    return names


def fixed_pattern(name: str) -> re.Pattern:
    """The compiled pattern of `regex:PATTERN`; ConfigError for a bad one."""
    pattern = name[len(FIXED_REGEX):]
    try:
        return re.compile(pattern, flags=re.DOTALL)
    except re.error as err:
        raise ConfigError(f"eval.metric: bad regular expression {pattern!r} ({err})") from None


def check_name(name: str) -> None:
    """ConfigError naming the choices for a name that is neither declared nor `regex:PATTERN`."""
    if name.startswith(FIXED_REGEX):
        fixed_pattern(name)
        return
    if name not in NAMES:
        choices = ", ".join(GENERIC + (FIXED_REGEX + "PATTERN",) + TASKS)
        raise ConfigError(f"eval.metric: unknown metric {name!r} (choose from {choices})")


def check_metric(metric: str) -> list[str]:
    """The names of an `eval.metric` list, each checked (what config validation calls)."""
    names = split_metrics(metric)
    for name in names:
        check_name(name)
    return names
