"""The report's closing sentence: was fine-tuning the right tool? Computed from the task table's rows (score,
prompt tokens and generation seconds per query), never written by hand.

The best prompt (base 0-shot, k-shot fixed, + retrieval: no training) is compared with the best fine-tuned row
(alone or + retrieval): the score gap in points, then what the winner costs per query against the other.
Scores within half a point are a tie, and the sentence says which is cheaper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

PROMPTS = ("base", "prompted", "retrieval")  # report.json task.<which>: rows without training
TUNED = ("finetuned", "finetuned_retrieval")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the task table: its label, score in [0, 1], mean prompt tokens and generation seconds per query."""

    label: str
    score: float | None
    prompt_tokens: float | None = None
    seconds: float | None = None
    tuned: bool = False


def labels(few_shot: Any = "k") -> dict[str, str]:
    """Each row's name in the report, the fixed prompt's k shown."""
    return {"base": "base 0-shot", "prompted": f"base {few_shot}-shot", "retrieval": "base + retrieval",
            "finetuned": "fine-tuned", "finetuned_retrieval": "fine-tuned + retrieval"}


def rows_of(report: dict, metric: str) -> list[Row]:
    """The rows of a report.json: `task.<which>.<metric>`, `.prompt_tokens`, `.seconds_per_query`."""
    names = labels(report.get("meta", {}).get("few_shot", "k"))
    task = report.get("task", {})
    return [Row(names[w], task[w].get(metric), task[w].get("prompt_tokens"), task[w].get("seconds_per_query"),
                tuned=w in TUNED) for w in PROMPTS + TUNED if w in task]


def ratio(a: float | None, b: float | None) -> str | None:
    """`a` against `b` in words a reader takes in at once: "1/9", "2.3×", "about the same"; None if unknown."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    r = a / b
    if r <= 0.75:
        return f"1/{round(1 / r)}"
    if r >= 1.33:
        return f"{r:.1f}×" if r < 10 else f"{r:.0f}×"
    return "about the same"


def _cost(winner: Row, other: Row, lead: str = "at") -> str:
    """", at 1/9 the prompt tokens and 1/2 the generation time per query" (the parts that were measured)."""
    parts = []
    for r, what in ((ratio(winner.prompt_tokens, other.prompt_tokens), "prompt tokens"),
                    (ratio(winner.seconds, other.seconds), "generation time")):
        if r is not None:
            parts.append(f"{r} {what}" if r == "about the same" else f"{r} the {what}")
    return f", {lead} {' and '.join(parts)} per query" if parts else ""


def _best(rows: Sequence[Row]) -> Row:
    """The highest score; among equal scores the fewest prompt tokens."""
    return max(rows, key=lambda r: (r.score, -(r.prompt_tokens if r.prompt_tokens is not None else float("inf"))))


def verdict(rows: Sequence[Row]) -> str | None:
    """The sentence for these rows, or None without both a prompted and a fine-tuned score."""
    scored = [r for r in rows if r.score is not None and not math.isnan(r.score)]
    prompts, tuned = [r for r in scored if not r.tuned], [r for r in scored if r.tuned]
    if not prompts or not tuned:
        return None
    prompt, model = _best(prompts), _best(tuned)
    points = round(100 * (model.score - prompt.score))
    pct = lambda r: f"{100 * r.score:.0f}%"
    if points > 0:
        return (f"{model.label} beats the best prompt ({prompt.label}) by {points} points "
                f"({pct(model)} vs {pct(prompt)}){_cost(model, prompt)}.")
    if points < 0:
        return (f"{prompt.label} beats {model.label} by {-points} points ({pct(prompt)} vs {pct(model)}) without "
                f"training{_cost(prompt, model)}.")
    return f"{model.label} ties the best prompt ({prompt.label}) at {pct(model)}{_cost(model, prompt, 'and needs')}."
