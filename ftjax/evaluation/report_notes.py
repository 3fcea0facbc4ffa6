"""report.md's plain-language parts: what each forgetting figure measures and which way is better, the run's
time split into training and report, and the sample replies (a section only when there are some)."""

from __future__ import annotations

FORGETTING_LEGEND = [
    "What the general-behaviour figures measure (on the retain prompts, which training never sees):",
    "",
    "- *retain NLL*: the mean negative log-likelihood per token of the base model's own replies; lower is "
    "better, and the base's figure is what an unchanged model scores.",
    "- *KL(base ‖ model)*: how far the model's next-token distribution moved from the base's on those replies, "
    "per token; 0 is the base itself, lower is better.",
    "- *general QA accuracy*: the share of short general questions whose reply contains the known answer; "
    "higher is better.",
    "",
]


def run_times(run: dict) -> str | None:
    """"training X min, report Y min" from the run's `wall_s` (the job until the report) and `report_s`."""
    parts = [f"training {run['wall_s'] / 60:.1f} min" if run.get("wall_s") is not None else None,
             f"report {run['report_s'] / 60:.1f} min" if run.get("report_s") is not None else None]
    return ", ".join(p for p in parts if p) or None


def sample_replies(samples: dict) -> list[str]:
    """The "Sample replies" section: one reply from each model on the same prompt; nothing when none was kept
    (a preference objective generates none)."""
    kept = {which: s for which, s in samples.items() if which != "qa" and s}
    if not kept:
        return []
    out = ["## Sample replies", ""]
    for which, s in kept.items():
        out += [f"**{which}**", "", f"- prompt: {s['prompt']!r}", f"- expected: {s['expected']!r}",
                f"- reply: {s['reply']!r}", ""]
    return out
