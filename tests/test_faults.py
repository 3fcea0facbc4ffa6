"""Faults a cluster produces on its own, each met with one line that names the path or process and what was kept
(details in WORKDIR/faults.log), never a traceback: a second run on a held workdir, a full disk during a save, a
damaged checkpoint, kill -9 during an export and after a log step past the last save. Real processes of
scripts/train.py and scripts/export.py on configs/tiny_test.py; losses compared with one straight run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop_helpers import ROOT, metrics, said, script_env

pytestmark = pytest.mark.slow

STEPS = 8
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT / 'configs' / 'tiny_test.py'}",
         "--config.eval.final=false", "--config.checkpoint.every=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One $FTJAX_CACHE for the module's runs, as a user's runs share it."""
    return tmp_path_factory.mktemp("ftjax_cache")


def _train(workdir, *flags, cache, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, f"--workdir={workdir}", *flags], env=script_env(fault=fault, FTJAX_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _losses(workdir) -> dict[int, float]:
    rows = [r for r in metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines without the progress bar's redraws; no traceback anywhere."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    return said(proc.stderr)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """An uninterrupted run: 8 steps, checkpoints at 2, 4, 6, 8 (the latest two kept)."""
    workdir = tmp_path_factory.mktemp("straight")
    proc = _train(workdir, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))
    return workdir


def _same_losses_from(workdir, straight, step: int) -> None:
    got, want = _losses(workdir), _losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert {s: got[s] for s in got if s > step} == {s: want[s] for s in want if s > step}


def test_a_second_run_on_a_held_workdir_is_refused_and_readers_take_complete_checkpoints(cache, tmp_path):
    workdir = tmp_path / "run"
    cmd = [*TRAIN, f"--workdir={workdir}", "--config.train.steps=400"]
    first = subprocess.Popen(cmd, env=script_env(FTJAX_CACHE=str(cache)), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "checkpoints" / "2").is_dir():  # a complete checkpoint, the run going on
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach step 2"
            time.sleep(0.5)
        second = subprocess.run(cmd, env=script_env(FTJAX_CACHE=str(cache)), capture_output=True, text=True,
                                timeout=300, cwd=ROOT)
        lines = _error_lines(second)
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"error: {workdir} is in use by another run (pid {first.pid} on ")
        assert second.stdout == ""  # refused before any work

        out = tmp_path / "adapter"
        export = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"--workdir={workdir}",
                                 "--format=peft", f"--out={out}", "--step=latest"],
                                env=script_env(FTJAX_CACHE=str(cache)), capture_output=True, text=True, timeout=300,
                                cwd=ROOT)
        assert export.returncode == 0, export.stderr[-3000:]
        assert f"a run holds this workdir (pid {first.pid} on " in export.stdout
        assert "read from its complete checkpoints only" in export.stdout
        assert (out / "adapter_model.safetensors").is_file()
    finally:
        first.send_signal(signal.SIGTERM)  # a requested stop: the first run saves and exits
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 143, out[-2000:]
    steps = [r["step"] for r in metrics(workdir) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one line per logged step: the second run wrote nothing


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return proc.returncode == 0


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes(straight, cache, tmp_path):
    size = sum(p.stat().st_size for p in (straight / "checkpoints" / "8").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(2.6 * size) + 96 * 1024):  # two checkpoints and the run's files fit, three do not
        pytest.skip("needs root to mount a small tmpfs (CI's runner is root)")
    try:
        proc = _train(disk / "run", cache=cache)
        lines = _error_lines(proc)
        assert proc.returncode == 74 and len(lines) == 1, proc.stderr[-3000:]
        kept = max(int(p.name) for p in (disk / "run" / "checkpoints").iterdir())
        assert lines[0].startswith(f"error: cannot save step {kept + 2} to {disk / 'run' / 'checkpoints'}: no space "
                                   "left on device (")
        assert f"the last complete checkpoint is {disk / 'run' / 'checkpoints' / str(kept)} (kept); details in " \
            in lines[0]
        log = Path(lines[0].rsplit("details in ", 1)[1])  # the workdir's disk is full: the system's temporary folder
        assert "No space left on device" in log.read_text()
        assert "warning: " in proc.stdout and "checkpoint.keep=2 checkpoints of ~" in proc.stdout  # before saving
        assert not list((disk / "run" / "checkpoints").glob("*tmp*"))  # the partial step folder is gone
        resumed = tmp_path / "resumed"
        shutil.copytree(disk / "run", resumed)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    proc = _train(resumed, cache=cache)
    assert proc.returncode == 0 and f"resumed from step {kept}" in proc.stdout, proc.stderr[-3000:]
    _same_losses_from(resumed, straight, kept)


@pytest.mark.parametrize("damage", ["truncated array file", "removed metadata file"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(straight, cache, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    latest = workdir / "checkpoints" / "8"  # beside it, 6 (keep=2)
    if damage == "truncated array file":
        biggest = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        os.truncate(biggest, biggest.stat().st_size // 3)
    else:
        (latest / "state" / "_METADATA").unlink()
    proc = _train(workdir, cache=cache)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [ln for ln in proc.stdout.splitlines() if "cannot be read" in ln]
    assert len(said) == 1 and said[0].startswith(f"checkpoint 8 in {workdir / 'checkpoints'} cannot be read ("), \
        proc.stdout
    assert f"moved to {workdir / 'damaged_checkpoints'}, kept; resuming from step 6" in said[0]
    assert (workdir / "damaged_checkpoints" / "8").is_dir() and "resumed from step 6" in proc.stdout
    _same_losses_from(workdir, straight, 6)  # steps 7 and 8 again, as the straight run took them


def test_kill_during_an_export_leaves_the_previous_export_or_nothing(straight, cache, tmp_path):
    out = tmp_path / "adapter"

    def export(fault: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"--workdir={straight}",
                               "--format=peft", f"--out={out}"], env=script_env(fault=fault, FTJAX_CACHE=str(cache)),
                              capture_output=True, text=True, timeout=300, cwd=ROOT)

    killed = export("kill@writing")
    assert killed.returncode == -signal.SIGKILL and not out.exists()  # nothing at --out
    assert (tmp_path / "adapter.partial").is_dir()  # what it left, beside --out
    done = export()
    assert done.returncode == 0 and not (tmp_path / "adapter.partial").exists(), done.stderr[-3000:]
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(previous)
    killed = export("kill@writing")
    assert killed.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous  # the previous export, whole


def test_kill_after_a_log_step_past_the_last_save_then_resume_logs_each_step_once(straight, cache, tmp_path):
    killed = _train(tmp_path, "--config.checkpoint.every=3", cache=cache, fault="kill@6")  # saved 3; logged 4, 5
    assert killed.returncode == -signal.SIGKILL
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5]
    proc = _train(tmp_path, "--config.checkpoint.every=3", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = 3 if "resumed from step 3" in proc.stdout else 0  # the async save of step 3 may have been cut off
    moved = [ln for ln in proc.stdout.splitlines() if "moved to metrics.cut.jsonl" in ln]
    assert len(moved) == 1 and moved[0].startswith(f"{5 - kept} rows of {tmp_path / 'metrics.jsonl'} logged ")
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    cut = [json.loads(ln) for ln in (tmp_path / "metrics.cut.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut if "loss" in r] == list(range(kept + 1, 6))  # kept aside, not lost
    _same_losses_from(tmp_path, straight, 0)
