"""loss.png: the train and eval loss curves read back from metrics.jsonl."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ftjax.metrics.writer import read_metrics


def loss_curve(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train points, eval points) behind loss.png: a train loss for every step, from each logged line's
    `step_losses` (the losses of the steps since the previous logged line), else its `loss`."""
    train: dict[int, float] = {}
    for r in records:
        losses = r.get("step_losses")
        if losses:
            first = r["step"] - len(losses) + 1
            train.update({first + i: float(v) for i, v in enumerate(losses)})
        elif r.get("loss") is not None:
            train[r["step"]] = float(r["loss"])
    evals = [(r["step"], float(r["eval_loss"])) for r in records if r.get("eval_loss") is not None]
    return sorted(train.items()), evals


def plot_losses(workdir: str | os.PathLike) -> Path:
    """loss.png: train loss at every step, eval loss where measured; log scale when they span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_curve(read_metrics(workdir))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), ".-" if len(train) < 50 else "-", label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    values = [v for _, v in train + evals if v > 0 and math.isfinite(v)]
    if values and max(values) / min(values) >= 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(workdir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
