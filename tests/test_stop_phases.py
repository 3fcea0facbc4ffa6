"""A requested stop at any phase exits with its documented code, prints one line naming the command that
finishes the job and no traceback; running that command finishes with the report an uninterrupted run
writes. A resume on a changed config is refused in one line before any work."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from loop_helpers import ROOT

STEPS = "--config.train.steps=4"


def _train(workdir, *flags, fault: str = "", cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTJAX_FAULT": fault}
    cmd = cmd or [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
                  f"--workdir={workdir}", STEPS, "--config.checkpoint.every=2", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def _finish_command(proc: subprocess.CompletedProcess) -> list[str]:
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    head, sep, command = last.partition(". To finish the job, run: ")
    assert sep and head.startswith("stopped by SIGINT during "), last
    argv = shlex.split(command)
    return [sys.executable, *argv[1:]]  # the same interpreter the line names by its base name


def _report(workdir) -> dict:
    report = json.loads((workdir / "report.json").read_text())
    return {"task": report["task"], "forgetting": report["forgetting"], "step": report["meta"]["step"]}


@pytest.mark.slow
def test_a_stop_during_the_report_or_an_eval_finishes_by_the_printed_command(tmp_path):
    straight = _train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = _report(tmp_path / "straight")

    stopped = _train(tmp_path / "report", fault="int@report")
    assert stopped.returncode == 130 and not (tmp_path / "report" / "report.json").exists(), stopped.stderr[-3000:]
    assert "during the final report, " in stopped.stderr.strip().splitlines()[-1]
    again = _train(tmp_path / "report", cmd=_finish_command(stopped))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout and _report(tmp_path / "report") == expected

    stopped = _train(tmp_path / "eval", "--config.eval.every=2", fault="int@eval")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert "during training, evaluation at step 2, " in last and "; step 2 saved." in last
    again = _train(tmp_path / "eval", "--config.eval.every=2", cmd=_finish_command(stopped))
    assert again.returncode == 0 and "resumed from step 2" in again.stdout, again.stderr[-3000:]


@pytest.mark.slow
def test_a_changed_config_is_refused_in_one_line_before_any_work(tmp_path):
    first = _train(tmp_path, "--config.eval.final=false")
    assert first.returncode == 0, first.stderr[-3000:]
    for flag, key, was, now in [("--config.method=full", "method", "'lora'", "'full'"),
                                ("--config.lora.rank=8", "lora.rank", "4", "8"),
                                ("--config.lora.targets=q_proj,v_proj", "lora.targets",
                                 repr("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"), "'q_proj,v_proj'"),
                                ("--config.lora.alpha=4.0", "lora.alpha", "8.0", "4.0"),
                                ("--config.model.dtype=bfloat16", "model.dtype", "'float32'", "'bfloat16'")]:
        proc = _train(tmp_path, "--config.eval.final=false", "--config.train.steps=6", flag)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith(f"error: cannot resume: {key} was {was} in this workdir's run, now {now}")
        assert "--workdir=NEW" in lines[0] and "resumed from" not in proc.stdout
