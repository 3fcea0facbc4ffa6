"""What fine-tuning bought and what it cost: task scores vs base and few-shot baselines, and forgetting.

One idea per module:

    scorers        exact / json_valid / contains / regex / task scorers (eval.metric)
    conversations  eval records as prompt turns + reference; few-shot prompts from train records
    task           evaluate_task: batched greedy generation scored by eval.metric, + reference loss
    token_stats    teacher-forced per-token NLL and KL(base ‖ model), chunked over the length
    divergence     token_kl, token_nll (shared with ftjax.train.regularizers)
    base           adapters_off / base_view: a LoRA model's base without a copy of the weights
    retain         the retain set (bundled retain.jsonl, or forget.retain)
    forgetting     base_replies (cached), forgetting_metrics (kl_to_base, retain NLLs, QA accuracy)
    replay         write_replay_file, replay_mixture, retain_iterator (forgetting control)
    report         build_report / write_report: report.json, report.md, printed table
    progress       tracking_metrics (names logged to metrics.jsonl), plot_progress (progress.png)
    run            Evaluation: the object the training loop and scripts/eval.py drive

Submodules are imported on first use, so `ftjax.config` can import the scorers cheaply.
"""

import importlib

_EXPORTS = {
    "evaluate_task": "task", "TaskResult": "task",
    "pick_shots": "conversations", "few_shot_turns": "conversations", "load_records": "conversations",
    "make_scorer": "scorers", "metric_names": "scorers",
    "adapters_off": "base", "base_view": "base",
    "load_retain": "retain",
    "base_replies": "forgetting", "forgetting_metrics": "forgetting", "BaseReplies": "forgetting",
    "write_replay_file": "replay", "replay_mixture": "replay", "retain_iterator": "replay",
    "build_report": "report", "write_report": "report", "format_tables": "report",
    "tracking_metrics": "progress", "plot_progress": "progress",
    "Evaluation": "run", "load_run": "workdir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ftjax.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ftjax.evaluation' has no attribute {name!r}")
