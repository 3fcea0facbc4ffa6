"""A requested stop at any phase (an eval, the report, export) exits with its documented code, prints one line
naming the command that finishes the job and no traceback; running that command finishes with the report (or
the export) an uninterrupted run writes. A resume on a changed config is refused in one line before any work."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from ftjax.errors import ConfigError
from loop_helpers import ROOT, script_env

STEPS = "--config.train.steps=4"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One $FTJAX_CACHE for the module's runs: the base's results are measured once, as for a user's runs."""
    return tmp_path_factory.mktemp("ftjax_cache")


def _train(workdir, *flags, cache, fault: str = "", cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = cmd or [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
                  f"--workdir={workdir}", STEPS, "--config.checkpoint.every=2", *flags]
    return _run(cmd, cache, fault)


def _run(cmd: list[str], cache, fault: str = "") -> subprocess.CompletedProcess:
    env = script_env(fault=fault, FTJAX_CACHE=str(cache))  # one device: stops, not the mesh, are the subject
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def _finish_command(proc: subprocess.CompletedProcess, phase: str) -> list[str]:
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    head, sep, command = last.partition(". To finish the job, run: ")
    assert sep and head.startswith(f"stopped by SIGINT during {phase}"), last
    argv = shlex.split(command)
    assert argv[0] == sys.executable, command  # the interpreter that ran the job, as printed
    return argv


def _report(workdir) -> dict:
    from ftjax.evaluation.task import TIMED_FIELDS

    report = json.loads((workdir / "report.json").read_text())
    task = {row: {k: v for k, v in figures.items() if k not in TIMED_FIELDS} for row, figures in report["task"].items()}
    return {"task": task, "forgetting": report["forgetting"], "step": report["meta"]["step"]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """An uninterrupted run: 4 steps, checkpoints at 2 and 4, the final report."""
    workdir = tmp_path_factory.mktemp("straight")
    proc = _train(workdir, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_a_stop_during_the_report_or_an_eval_finishes_by_the_printed_command(straight, cache, tmp_path):
    expected = _report(straight)

    stopped = _train(tmp_path / "report", cache=cache, fault="int@report")
    assert stopped.returncode == 130 and not (tmp_path / "report" / "report.json").exists(), stopped.stderr[-3000:]
    assert "during the final report, " in stopped.stderr.strip().splitlines()[-1]
    again = _run(_finish_command(stopped, "the final report"), cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout and _report(tmp_path / "report") == expected

    stopped = _train(tmp_path / "eval", "--config.eval.every=2", cache=cache, fault="int@eval")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert "during training, evaluation at step 2, " in last and "; step 2 saved." in last
    again = _run(_finish_command(stopped, "training, evaluation at step 2"), cache)
    assert again.returncode == 0 and "resumed from step 2" in again.stdout, again.stderr[-3000:]
    assert _report(tmp_path / "eval") == expected  # an eval on the way changes neither the weights nor the report


@pytest.mark.slow
def test_a_stop_during_export_writes_nothing_and_the_printed_command_exports(straight, cache, tmp_path):
    from ftjax.interop.peft import export_peft
    from ftjax.workdir import load_trained

    out = tmp_path / "adapter"
    export = [sys.executable, str(ROOT / "scripts" / "export.py"), f"--workdir={straight}", "--format=peft",
              f"--out={out}"]
    stopped = _run(export, cache, fault="int@export")
    assert stopped.returncode == 130 and not out.exists(), stopped.stderr[-3000:]
    again = _run(_finish_command(stopped, f"export of {straight}"), cache)
    assert again.returncode == 0 and f"exported step 4 of {straight} as peft" in again.stdout, again.stderr[-3000:]

    run = load_trained(straight)  # the uninterrupted export, in this process
    want = export_peft(run.model, tmp_path / "want", base_model_name_or_path=run.config.model.path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (want / name).read_bytes(), name


@pytest.mark.slow
def test_a_changed_config_is_refused_in_one_line_before_any_work(straight, cache):
    from ftjax.train.loop import run
    from ftjax.workdir import config_from_workdir

    # Through the entry point: exit 2, one line, no traceback, nothing started.
    proc = _train(straight, "--config.train.steps=6", "--config.method=full", cache=cache)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: cannot resume: method was 'lora' in this workdir's run, now 'full'")
    assert "--workdir=NEW" in lines[0] and "resumed from" not in proc.stdout
    # Each other key through the loop itself (the entry point prints any ConfigError as the line above).
    for key, was, now, value in [
            ("lora.rank", "4", "8", 8),
            ("lora.targets", repr("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"), "'q_proj,v_proj'",
             "q_proj,v_proj"),
            ("lora.alpha", "8.0", "4.0", 4.0),
            ("model.dtype", "'float32'", "'bfloat16'", "bfloat16")]:
        c = config_from_workdir(straight)
        c.train.steps = 6
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
        with pytest.raises(ConfigError) as refused:
            run(c, straight)
        assert str(refused.value).startswith(f"cannot resume: {key} was {was} in this workdir's run, now {now}")
        assert "--workdir=NEW" in str(refused.value)
