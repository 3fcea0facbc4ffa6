"""`eval.report`, one knob for the whole after-training report's size: `full` (every setting as configured),
`quick` (task scores and every eval-loss row on the same first QUICK_EXAMPLES eval examples, without the fine-tuned
+ retrieval row: minutes, not tens of minutes, on a CPU) or `none` (no report: training ends at its last save).
`eval.loss_examples` says which examples the eval-loss rows are measured on: `scored` (the task rows' own, the
default) or `all`."""

from __future__ import annotations

from typing import Any

SIZES = ("full", "quick", "none")
QUICK_EXAMPLES = 20


def max_examples(c: Any) -> int:
    """How many eval examples the task rows score."""
    if c.eval.report == "quick":
        return min(c.eval.max_examples, QUICK_EXAMPLES)
    return c.eval.max_examples


def loss_on_all(c: Any) -> bool:
    """Whether the eval-loss rows cover every eval example (`eval.loss_examples=all` in a full report) or the
    task rows' examples only (each baseline scored on what it is compared on)."""
    return c.eval.report != "quick" and c.eval.loss_examples == "all"


def tuned_retrieval(c: Any) -> bool:
    """Whether the fine-tuned + retrieval row is measured: not in a quick report. The base rows (0-shot, k-shot,
    + retrieval) are cached across runs, so a quick report keeps them at no cost after the first; this row is
    generated again on every run, with the longest prompts."""
    return c.eval.report != "quick"


def identity(c: Any) -> dict[str, Any]:
    """What the report's size adds to the cached baselines' key (a full report over every example keeps the
    key it always had, so results cached before stay valid)."""
    if c.eval.report == "quick":
        return {"report": "quick", "max_examples": max_examples(c)}
    return {} if loss_on_all(c) else {"loss_examples": "scored"}


def reports(c: Any) -> bool:
    """Whether training ends with the report."""
    return c.eval.report != "none"
