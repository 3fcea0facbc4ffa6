"""The run's last eval point when the report follows: measured once (by the report), logged at the last step,
and the same cross-entropy the loop's own eval loss measured (tested against it on the tiny run)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ftjax.metrics.writer import read_metrics
from ftjax.objectives import sft
from ftjax.train.compose import compose
from ftjax.train.final_eval import from_report
from ftjax.train.loop import run
from loop_helpers import load_config, metrics

MODEL_TOL = 1e-4  # fp32 CPU, a whole model
TASK = SimpleNamespace(has_task=True)  # an Evaluation with eval records


def test_only_a_run_without_periodic_evals_whose_report_follows_takes_the_reports_figure():
    c = load_config()  # 8 steps, eval.every=0, a full report
    assert from_report(compose(c), TASK)
    assert not from_report(compose(c), None)  # no report at all
    assert not from_report(compose(c), SimpleNamespace(has_task=False))  # no eval records to score
    c.eval.every = 4  # periodic points on every eval row: the last one on the same rows
    assert not from_report(compose(c), TASK)
    c.eval.every = 100  # never due within the run: the last point is the only one
    assert from_report(compose(c), TASK)
    c.eval.report = "none"
    assert not from_report(compose(c), TASK)
    c.eval.report, c.eval.final = "full", False
    assert not from_report(compose(c), TASK)


@pytest.mark.slow  # two tiny runs, one with its report (> 10 s here)
def test_the_reports_eval_loss_is_the_last_point_and_equals_the_loops_own(tmp_path, monkeypatch):
    calls = []
    loop_eval = sft.eval_loss
    monkeypatch.setattr(sft, "eval_loss", lambda *a, **k: calls.append(1) or loop_eval(*a, **k))
    c = load_config()
    c.train.steps, c.checkpoint.every = 2, 0
    c.eval.report = "none"  # the old computation: the loop's eval loss over every eval row
    run(c, tmp_path / "own")
    assert len(calls) == 1
    own = metrics(tmp_path / "own")

    c.eval.report, c.eval.loss_examples = "full", "all"  # the report's eval-loss rows over every eval record too
    run(c, tmp_path / "report")
    assert len(calls) == 1  # the loop measured nothing at the last step: the report did, once
    logged = metrics(tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    # the last step's line as it ended (before the report), then the report's figure at that step
    assert [r["step"] for r in logged] == [1, 2, 2] and set(logged[-1]) == {"step", "eval_loss", "eval_loss_examples"}
    assert [r["loss"] for r in logged[:2]] == [r["loss"] for r in own]
    assert {"loss", "tokens_per_s", "mfu"} <= set(logged[1]) and "eval_loss" not in logged[1]
    last = read_metrics(tmp_path / "report")[-1]  # a step's lines merged, as every reader of metrics.jsonl does
    assert {"loss", "tokens_per_s", "mfu", "eval_loss"} <= set(last) and last["step"] == 2
    assert last["eval_loss"] == report["task"]["finetuned"]["eval_loss"]
    assert last["eval_loss_examples"] == report["meta"]["eval_loss_examples"] == len(open(c.data.eval).readlines())
    assert last["eval_loss"] == pytest.approx(own[-1]["eval_loss"], abs=MODEL_TOL)
