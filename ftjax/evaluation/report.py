"""The before/after report: WORKDIR/report.json, report.md and a printed table.

report.json is nested JSON whose dotted paths are the contract (ARCHITECTURE.md, "The contract users rely on"):

    task.base.<metric>, task.prompted.<metric>, task.finetuned.<metric>   (<metric>: each eval.metric score)
    task.base.eval_loss, task.prompted.eval_loss, task.finetuned.eval_loss
    task.<which>.prompt_tokens, task.<which>.seconds_per_query   (what a query costs: mean prompt tokens, and
        generation wall seconds on this run's devices)
    task.retrieval.*, task.finetuned_retrieval.*   (with eval.few_shot > 0: base / fine-tuned + retrieval)
    verdict: the closing sentence, computed from the task rows (ftjax/evaluation/verdict.py)
    forgetting.kl_to_base, forgetting.retain_nll_base, forgetting.retain_nll_finetuned,
    forgetting.qa_accuracy_base, forgetting.qa_accuracy_finetuned
    samples.{base,prompted,finetuned}: {prompt, expected, reply, scores}; samples.qa: [{question, answer,
        base, finetuned}]
    meta: {step, model, method, metric, few_shot, task_examples, retain_prompts, retain_tokens, qa_questions,
        retrieval: {k, retriever, from, source, template}}
    preference.{base,finetuned}.{accuracy, margin, pairs}   (preference objectives: held-out pairs)
    held_out: {key, rows, about}   (an objective's own rows: the section `key` holds, as the table prints them)

`task` and `forgetting` hold only those entries (a value is null where it was not measured), so a
dashboard may read every `task.<which>.<name>` as a number.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ftjax.evaluation import phase_times, report_notes
from ftjax.evaluation.scorers import contains_answer
from ftjax.evaluation.verdict import rows_of, verdict
from ftjax.whole_file import write_whole

REQUIRED = ("base", "prompted", "finetuned")  # the contract's rows (check_report)
MODELS = ("base", "prompted", "retrieval", "finetuned", "finetuned_retrieval")  # every row, in the table's order
OPTIONAL = ("retrieval", "finetuned_retrieval")  # columns shown only when measured
COSTS = ("prompt_tokens", "seconds_per_query")
FORGETTING_KEYS = ("kl_to_base", "retain_nll_base", "retain_nll_finetuned")
REPORT_JSON, REPORT_MD = "report.json", "report.md"


def contract_keys(report: dict) -> list[str]:
    """Every dotted key of the report's `task` and `forgetting` sections."""
    keys = []
    for which, scores in report.get("task", {}).items():
        keys += [f"task.{which}.{name}" for name in scores]
    keys += [f"forgetting.{name}" for name in report.get("forgetting", {})]
    return keys


def check_report(report: dict, metrics: list[str]) -> None:
    """Raise ValueError naming the first contract key the report lacks."""
    want = [f"task.{w}.{m}" for w in REQUIRED for m in [*metrics, "eval_loss"]]
    want += [f"forgetting.{k}" for k in FORGETTING_KEYS]
    have = set(contract_keys(report))
    missing = [k for k in want if k not in have]
    if missing:
        raise ValueError(f"report lacks contract key(s): {', '.join(missing)}")


def fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def score_names(report: dict) -> list[str]:
    """The eval.metric scores of the task rows, in the metric's order (the first one is the verdict's)."""
    task = report.get("task", {})
    return [n for n in task.get("finetuned", task.get("base", {})) if n != "eval_loss" and n not in COSTS]


def _columns(report: dict) -> list[str]:
    """The task table's columns: base 0-shot, k-shot and fine-tuned always; the retrieval rows when measured."""
    task = report.get("task", {})
    return [w for w in MODELS if w not in OPTIONAL or w in task]


def _task_rows(report: dict) -> list[list[str]]:
    task, columns = report.get("task", {}), _columns(report)
    k = report.get("meta", {}).get("task_examples")
    rows = [[f"{n} ({k} examples)" if k else n] + [fmt(task.get(w, {}).get(n), pct=True) for w in columns]
            for n in score_names(report)]
    n = report.get("meta", {}).get("eval_loss_examples")
    rows.append([f"eval loss ({n} examples)" if n else "eval loss"] + [fmt(task.get(w, {}).get("eval_loss"))
                                                                      for w in columns])
    cost = lambda w, key, digits: ("-" if task.get(w, {}).get(key) is None else f"{task[w][key]:.{digits}f}")
    rows.append(["prompt tokens / query"] + [cost(w, "prompt_tokens", 0) for w in columns])
    rows.append(["generation s / query"] + [cost(w, "seconds_per_query", 3) for w in columns])
    return rows


def _forget_rows(report: dict) -> list[list[str]]:
    f = report.get("forgetting", {})
    return [["retain NLL (base's replies)", fmt(f.get("retain_nll_base")), fmt(f.get("retain_nll_finetuned"))],
            ["KL(base ‖ model), per token", fmt(0.0 if f.get("kl_to_base") is not None else None),
             fmt(f.get("kl_to_base"))],
            ["general QA accuracy", fmt(f.get("qa_accuracy_base"), True), fmt(f.get("qa_accuracy_finetuned"), True)]]


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    if markdown:
        return "\n".join([f"| {line(header)} |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                         + [f"| {line(r)} |" for r in rows])
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_tables(report: dict, markdown: bool = False) -> str:
    """The task table (base / prompted / fine-tuned) and the forgetting table (base / fine-tuned)."""
    k = report.get("meta", {}).get("few_shot", "k")
    names = {"base": "base (0-shot)", "prompted": f"base ({k}-shot)", "retrieval": "base + retrieval",
             "finetuned": "fine-tuned", "finetuned_retrieval": "fine-tuned + retrieval"}
    task = _table(["task"] + [names[w] for w in _columns(report)], _task_rows(report), markdown)
    forget = _table(["general behaviour", "base", "fine-tuned"], _forget_rows(report), markdown)
    held = report.get("held_out")  # the objective's own rows (e.g. preference accuracy on held-out pairs)
    if held:
        rows = _table([held["key"], "base", "fine-tuned"], held["rows"], markdown)
        return f"{rows}\n\n{forget}" if not report["task"] else f"{task}\n\n{rows}\n\n{forget}"
    return f"{task}\n\n{forget}"


def format_samples(report: dict, width: int = 160) -> str:
    """One sample reply from each model on the same eval prompt, for the printed report."""
    samples = {w: s for w, s in report.get("samples", {}).items() if w != "qa" and s}
    if not samples:
        return ""
    first = next(iter(samples.values()))
    clip = lambda t: (t if len(t) <= width else t[:width - 3] + "...")
    prompt = " ".join(str(first["prompt"]).split())
    lines = [f"sample prompt: {clip(prompt)}", f"  expected:   {clip(repr(first['expected']))}"]
    lines += [f"  {which + ':':11} {clip(repr(' '.join(str(s['reply']).split())))}" for which, s in samples.items()]
    return "\n".join(lines)


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return "" if text is None else " ".join(str(text).split()).replace("|", "\\|")


def _mark(q: dict, which: str) -> str:
    """A QA reply cell, ✓ when it counted as correct."""
    if which not in q:
        return ""
    return ("✓ " if q.get(f"{which}_correct") else "") + _cell(q[which])


def _settings(meta: dict) -> list[str]:
    """The run's settings line: steps, lr, batch, wall time and the checkpoint the figures are for."""
    run = meta.get("run") or {}
    if not run:
        return []
    parts = [f"{run['steps']} steps" if "steps" in run else None,
             f"lr {run['lr']:g}" if "lr" in run else None,
             f"batch {run['batch_size']} x {run['seq_len']} tokens" if "batch_size" in run else None,
             f"LoRA rank {run['lora_rank']}" if run.get("lora_rank") else None,
             report_notes.run_times(run)]
    step, final = meta.get("step"), meta.get("final_step")
    checkpoint = f"checkpoint: step {step}" + (f" (the best by eval loss; the run ended at step {final})"
                                               if final is not None and final != step else "")
    return ["Run: " + ", ".join(p for p in parts if p) + f"; {checkpoint}.", ""]


def _base_note(meta: dict) -> list[str]:
    """What "base" means when training ran against a quantized base (train.frozen_quant)."""
    if not meta.get("base_quant"):
        return []
    return [f"Base: the model as trained against, its frozen weights quantized: {meta['base_quant']}; the base "
            "columns and the forgetting figures compare with that quantized base, not the full-precision one.", ""]


def _evaluated(report: dict) -> str:
    """What the before / after comparison is on: the task metric's eval examples, or held-out preference pairs."""
    meta = report.get("meta", {})
    if report.get("held_out") and not report["task"]:
        return f"objective `{meta.get('objective', '?')}`, {report['held_out']['about']}"
    return f"task metric `{meta.get('metric')}` on {meta.get('task_examples', '?')} eval examples"


def _markdown(report: dict) -> str:
    meta = report.get("meta", {})
    out = [f"# Fine-tuning report (step {meta.get('step', '?')})", "",
           f"Model `{meta.get('model', '?')}`, method `{meta.get('method', '?')}`; " + _evaluated(report) +
           f"; retain set: {meta.get('retain_prompts', '?')} prompts "
           f"({meta.get('retain_tokens', '?')} reply tokens) with {meta.get('qa_questions', '?')} known answers.", "",
           *_base_note(meta), *_settings(meta), format_tables(report, markdown=True), "",
           *report_notes.cost_legend(report), *report_notes.retrieval_note(meta.get("retrieval")),
           *report_notes.FORGETTING_LEGEND, *report_notes.sample_replies(report.get("samples", {}))]
    qa = report.get("samples", {}).get("qa") or []
    if qa:
        out += ["## General questions", "", "✓: the reply contains the known answer (what QA accuracy counts).", "",
                "| question | answer | base | fine-tuned |", "|---|---|---|---|"]
        out += [f"| {_cell(q['question'])} | {_cell(q['answer'])} | {_mark(q, 'base')} | {_mark(q, 'finetuned')} |"
                for q in qa]
        out += [""]
    out += phase_times.table(meta.get("phases", []), (meta.get("run") or {}).get("report_s"))
    if report.get("verdict"):
        out += ["## Verdict", "", report["verdict"], ""]
    return "\n".join(out).replace("\r", " ") + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a crash leaves the old file or none), mode 0644."""
    write_whole(path, text)


def write_report(workdir: str | os.PathLike, report: dict, *, echo: bool = True) -> dict:
    """Write report.json and report.md into `workdir` (process 0 only) and print the tables."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(workdir / REPORT_MD, _markdown(report))
    if echo:
        samples = format_samples(report)
        closing = f"\n\nverdict: {report['verdict']}" if report.get("verdict") else ""
        print(format_tables(report) + (f"\n\n{samples}" if samples else "") + closing, flush=True)
    return report


def build_report(task: dict[str, Any], forgetting: Any = None, base_replies: Any = None, *,
                 meta: dict | None = None, held_out: dict | None = None) -> dict:
    """The report from `TaskResult`s by model name (MODELS: "base", "prompted", "retrieval", "finetuned",
    "finetuned_retrieval") and a `ForgettingResult`
    (with the `BaseReplies` it was measured on, for counts and QA samples); `held_out`: the objective's rows
    (`key`: its section {base, finetuned}, `rows` as printed, `about`)."""
    report: dict[str, Any] = {"task": {}, "forgetting": {}, "samples": {}, "meta": dict(meta or {})}
    if held_out is not None:
        report[held_out["key"]] = held_out["section"]
        report["held_out"] = {k: held_out[k] for k in ("key", "rows", "about")}
    for which in MODELS:
        result = task.get(which)
        if result is None:
            continue
        report["task"][which] = {**result.scores, "eval_loss": result.eval_loss,
                                 "prompt_tokens": result.prompt_tokens, "seconds_per_query": result.seconds_per_query}
        report["samples"][which] = result.sample(0)
        report["meta"].setdefault("task_examples", result.n)
        if result.loss_n is not None:
            report["meta"].setdefault("eval_loss_examples", result.loss_n)
    if report["task"] and score_names(report):
        report["verdict"] = verdict(rows_of(report, score_names(report)[0]))
    if forgetting is not None:
        report["forgetting"] = dict(forgetting.metrics)
    if base_replies is not None:
        report["meta"].update(retain_prompts=len(base_replies.items),
                              retain_tokens=int(sum(len(r) for r in base_replies.reply_ids)))
        asked = [i for i, it in enumerate(base_replies.items) if it.answer]
        report["meta"]["qa_questions"] = len(asked)
        tuned = forgetting.qa_replies if forgetting is not None else []
        report["samples"]["qa"] = [
            {"question": base_replies.items[i].prompt[-1][1], "answer": base_replies.items[i].answer,
             "base": base_replies.replies[i],
             "base_correct": bool(contains_answer(base_replies.replies[i], base_replies.items[i].answer)),
             **({"finetuned": tuned[j],
                 "finetuned_correct": bool(contains_answer(tuned[j], base_replies.items[i].answer))}
                if j < len(tuned) else {})}
            for j, i in enumerate(asked)]
    return report
