"""Task score and forgetting over training steps: the metric names the loop logs, and their plot.

Names in metrics.jsonl (logged every `eval.every` steps and at the end):
    task_<score>   each eval.metric score of the model being trained, e.g. task_exact, task_json_valid
    kl_to_base     KL(base ‖ model) per reply token on the retain set
    retain_nll     the model's NLL on the base's retain replies (retain_nll_finetuned at that step)
    qa_accuracy    general-question accuracy of the model at that step
and every logged step, when the regularizers are on: kl_reg, l2_reg (the terms' values before weighting); with
objective=grpo, `reward` (the mean reward of each step's rollouts) gets its own panel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ftjax.metrics.writer import read_metrics

TASK_PREFIX = "task_"
FORGETTING_NAMES = ("kl_to_base", "retain_nll", "qa_accuracy")
REGULARIZER_NAMES = ("kl_reg", "l2_reg")
PLOT_NAME = "progress.png"


def base_point(base_task: Any = None, forgetting: Any = None) -> dict[str, float]:
    """The base model's values as a step-0 point of the progress plot (its KL to itself is 0)."""
    out: dict[str, Any] = {"step": 0}
    if base_task is not None:
        out.update({f"{TASK_PREFIX}{k}": float(v) for k, v in base_task.scores.items()})
    if forgetting is not None:
        m = forgetting.metrics
        out["kl_to_base"] = 0.0
        for name, key in (("retain_nll", "retain_nll_base"), ("qa_accuracy", "qa_accuracy_base")):
            if m.get(key) is not None:
                out[name] = float(m[key])
    return out


def tracking_metrics(task: Any = None, forgetting: Any = None) -> dict[str, float]:
    """The values to log at an eval step, from a `TaskResult` and a `ForgettingResult` (either may be None)."""
    out: dict[str, float] = {}
    if task is not None:
        out.update({f"{TASK_PREFIX}{k}": float(v) for k, v in task.scores.items()})
    if forgetting is not None:
        m = forgetting.metrics
        for name, key in (("kl_to_base", "kl_to_base"), ("retain_nll", "retain_nll_finetuned"),
                          ("qa_accuracy", "qa_accuracy_finetuned")):
            if m.get(key) is not None:
                out[name] = float(m[key])
    return out


def progress_records(workdir: str | os.PathLike, points: Sequence[dict] = ()) -> list[dict]:
    """metrics.jsonl's records plus `points` at the steps it has no task / forgetting values for, by step."""
    records = read_metrics(workdir)
    tracked = {r["step"] for r in records if any(k.startswith(TASK_PREFIX) or k in FORGETTING_NAMES for k in r)}
    return sorted(records + [p for p in points if p["step"] not in tracked], key=lambda r: r["step"])


def panels(records: Sequence[dict]) -> list[tuple[str, str, list[str]]]:
    """progress.png's panels as (title, y label, series names): one y scale each, so KL and retain NLL, which
    move together, never share a plot with two axes that draw their lines on top of each other."""
    have = lambda name: any(r.get(name) is not None for r in records)
    scores = sorted({k for r in records for k in r if k.startswith(TASK_PREFIX)}) + (
        ["qa_accuracy"] if have("qa_accuracy") else [])
    out = [("task score / general QA (higher is better)", "score", scores)] if scores else []
    out += [(f"{name} on the retain set (lower is better)", name, [name]) for name in ("kl_to_base", "retain_nll")
            if have(name)]
    out += [("rollout reward, mean per step (higher is better)", "reward", ["reward"])] if have("reward") else []
    return out


def plot_progress(workdir: str | os.PathLike, points: Sequence[dict] = ()) -> Path | None:
    """progress.png: task scores, kl_to_base and retain_nll per step, a panel each, from metrics.jsonl plus
    `points` ({"step", name: value}; e.g. the base at step 0 and the final report's step) at steps the log
    does not track; None with nothing to plot."""
    records = progress_records(workdir, points)
    series = lambda name: [(r["step"], r[name]) for r in records if r.get(name) is not None]
    if not any(k.startswith(TASK_PREFIX) for r in records for k in r) and not series("kl_to_base"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = panels(records)
    fig, axes = plt.subplots(1, len(layout), figsize=(5 * len(layout), 4), squeeze=False)
    for ax, (title, ylabel, names) in zip(axes[0], layout):
        for name in names:
            ax.plot(*zip(*series(name)), "o-", label=name)
        if ylabel == "score":
            ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    out = Path(workdir) / PLOT_NAME
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
