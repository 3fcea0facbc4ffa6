"""report.md's plain-language parts: what each forgetting figure measures and which way is better, the run's
time split into training and report, what a query costs and how the retrieval rows were prompted, and the sample
replies (a section only when there are some)."""

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


def cost_legend(report: dict) -> list[str]:
    """What the cost rows measure, and on which devices (only when the task table has them)."""
    if not report.get("task"):
        return []
    devices = report.get("meta", {}).get("devices")
    return ["*prompt tokens / query*: the mean length of a prompt as the model reads it (chat template, examples "
            "and passages included); *generation s / query*: the wall time of generating all the replies (batched, "
            "compiling each prompt length once included) over their number" + (f", on {devices}" if devices else "")
            + ". A cached base row keeps the figures of the run that measured it.", ""]


def retrieval_note(retrieval: dict | None) -> list[str]:
    """How the + retrieval columns' prompts were made: the k retrieved examples, or the passages' template."""
    if not retrieval:
        return []
    k, source = retrieval["k"], retrieval.get("source", "?")
    head = f"*+ retrieval*: for each question, BM25 ({retrieval['retriever']}) "
    if retrieval.get("from") != "documents":
        return [head + f"picks the {k} training examples (`{source}`) whose prompts are most similar to its prompt; "
                "they come before it as earlier turns, as the fixed examples do, the most similar last.", ""]
    fence = "```"
    return [head + f"picks the {k} passages of `{source}` most similar to it and writes them into the question:",
            "", fence, retrieval["template"], fence, ""]


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
