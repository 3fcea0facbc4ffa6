"""scripts/eval.py on a trained tiny workdir: the report's contract keys, and the fine-tuned model restored
from the checkpoint gives the loop's own final eval loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftjax.evaluation.report import check_report
from ftjax.train.loop import run
from loop_helpers import ROOT, load_config, metrics, script_env

MODEL_TOL = 1e-4


@pytest.mark.slow
def test_eval_script_reports_a_trained_workdir(tmp_path):
    c = load_config()
    c.train.steps, c.eval.every, c.checkpoint.every = 2, 0, 0
    c.eval.report = "none"  # the loop's own final eval loss (a report would supply the last eval point)
    workdir = tmp_path / "run"
    run(c, workdir)
    loop_eval_loss = [r["eval_loss"] for r in metrics(workdir) if "eval_loss" in r][-1]

    env = script_env()  # one device: restored from a checkpoint saved on eight
    out = subprocess.run([sys.executable, "scripts/eval.py", f"--workdir={workdir}", "--metric=person_json",
                          f"--max_examples={len(open(c.data.eval).readlines())}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fine-tuned" in out.stdout and "KL(base" in out.stdout

    report = json.loads((workdir / "report.json").read_text())
    check_report(report, ["exact", "json_valid"])
    assert report["meta"]["step"] == 2
    # Same eval split, same trained tokens: the checkpoint's model reproduces the loop's eval loss.
    assert report["task"]["finetuned"]["eval_loss"] == pytest.approx(loop_eval_loss, abs=MODEL_TOL)
    assert report["task"]["base"]["eval_loss"] > report["task"]["finetuned"]["eval_loss"]
    assert report["forgetting"]["kl_to_base"] > 0
    assert (workdir / "report.md").is_file() and (workdir / "retain_replies.json").is_file()
