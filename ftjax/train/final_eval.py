"""The run's last eval point from the report: when the report follows training and the run has no periodic eval,
the loop skips its own eval loss at the last step (a forward pass over every eval row) and logs the report's
fine-tuned eval loss, which measures the same cross-entropy on the report's examples, at that step (a line of its own
after the step's, which was written as the step ended: a crash in the report loses nothing)."""

from __future__ import annotations

from typing import Any

from ftjax.evaluation import report_size


def from_report(run: Any, evaluation: Any) -> bool:
    """Whether the report supplies the last eval point: an SFT run (its held-out loss is the cross-entropy the
    report's eval-loss rows measure) whose report runs and scores eval records, with no periodic eval (the curve
    has this one point, so its rows are every point's rows)."""
    plan, s = run.evaluation, run.schedule
    periodic = bool(plan.every) and plan.every <= s.steps
    return (evaluation is not None and evaluation.has_task and run.objective.held_out_is_report_eval_loss and plan.final
            and report_size.reports(run.eval_settings) and not periodic)


def eval_point(report: dict) -> dict[str, Any]:
    """The report's fine-tuned eval loss as metrics.jsonl logs it, with the examples it covers (the first
    `eval_loss_examples` records of data.eval); {} when the report has none."""
    loss = report.get("task", {}).get("finetuned", {}).get("eval_loss")
    if loss is None:
        return {}
    return {"eval_loss": float(loss), "eval_loss_examples": report.get("meta", {}).get("eval_loss_examples")}
