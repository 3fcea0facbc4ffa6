"""What fine-tuning bought and what it cost: task scores vs base and few-shot baselines, and forgetting.

One idea per module (the retain set and replay data are in `ftjax.data.retain` and `ftjax.data.replay`):

    scorers        exact / json_valid / contains / regex / task scorers (eval.metric)
    conversations  eval records as prompt turns + reference; few-shot prompts from train records
    task           evaluate_task: batched greedy generation scored by eval.metric, + reference loss
    token_stats    teacher-forced per-token NLL and KL(base ‖ model), chunked over the length
    divergence     token_kl, token_nll (shared with ftjax.objectives.regularizers)
    base           adapters_off / base_view: a LoRA model's base without a copy of the weights
    forgetting     base_replies (cached), forgetting_metrics (kl_to_base, retain NLLs, QA accuracy)
    report         build_report / write_report: report.json, report.md, printed table
    progress       tracking_metrics (names logged to metrics.jsonl), plot_progress (progress.png)
    run            Evaluation: the object the training loop and scripts/eval.py drive
"""
