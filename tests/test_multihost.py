"""Multi-host for real: scripts/train.py in 2 processes x 2 simulated CPU devices (jax.distributed on 127.0.0.1,
gloo collectives) gives the same losses as 1 process x 4 devices on the same global batch; a stop on one host
stops all at one step and resumes exactly; a process that never joins is named.

Every process writes to the same workdir, as hosts on a shared filesystem do; metrics.jsonl is process 0's.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest

from ftjax.checkpoint import Checkpoints
from ftjax.metrics.writer import read_metrics
from loop_helpers import ROOT, load_config, metrics, said, script_env

pytestmark = pytest.mark.slow

STEPS = 4
RTOL = 1e-5  # ARCHITECTURE.md: the same loss to within float tolerance across process layouts
MODEL_TOL = 1e-4  # fp32 CPU, a whole model: the same figure by two code paths
EVERY_ROW = "--config.eval.loss_examples=all"  # the report's eval loss (the last point) over every eval record
MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT / 'configs' / 'tiny_test.py'}",
            f"--workdir={workdir}", f"--config.train.steps={STEPS}", *MESH, *flags]


def _env(devices: int, fault: str = "", **extra: str) -> dict[str, str]:
    return script_env(devices, fault, TOKENIZERS_PARALLELISM="false", **extra)


class Job:
    """One started process; its stdout/stderr go to files (no pipe can fill up and stall it)."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], logs: Path):
        self.name, self.out, self.err = name, logs / f"{name}.out", logs / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=err, cwd=logs)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def tail(self) -> str:
        return f"--- {self.name} stdout:\n{self.stdout()[-1500:]}\n--- {self.name} stderr:\n{self.stderr()[-3000:]}"


@contextlib.contextmanager
def _jobs(timeout_s: float) -> Iterator[tuple[list[Job], Callable[..., Job]]]:
    """Start jobs with `start(...)`; `wait()` for all within `timeout_s`. Whatever happens, none outlives the test."""
    jobs: list[Job] = []

    def start(name: str, cmd: Sequence[str], env: dict[str, str], logs: Path) -> Job:
        jobs.append(Job(name, cmd, env, logs))
        return jobs[-1]

    try:
        yield jobs, start
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            try:
                job.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{job.name} still running after {timeout_s:.0f} s\n" + "\n".join(j.tail() for j in jobs))
    finally:
        for job in jobs:
            if job.proc.poll() is None:
                job.proc.kill()
            job.proc.wait()


def _run_two_processes(workdir: Path, logs: Path, *flags: str, faults: tuple[str, str] = ("", ""),
                       timeout_s: float = 420):
    """scripts/train.py as processes 0 and 1 of 2, each with 2 simulated devices; returns their Jobs."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with _jobs(timeout_s) as (jobs, start):
        for i in range(2):
            start(f"p{i}", _command(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                    f"--process_id={i}", *flags), _env(2, fault=faults[i]), logs)
    return jobs


def _losses(workdir: Path) -> dict[int, dict]:
    """Each step's records merged (the last step's line, then the report's eval loss at that step)."""
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


_GLOO = ("[Gloo]", "is connected to", "peer ranks")


def _ours(stdout: str) -> list[str]:
    """Lines ftjax printed. Gloo's C++ connection messages are not ours; its threads write them in pieces
    that interleave ("[Gloo] Rank 0 is connected to 1[Gloo] Rank 1 ..." then " peer ranks. Expected ..."
    on a line of its own, seen under load), so every piece of one is left out."""
    return [ln for ln in stdout.splitlines()
            if ln.strip() and not ln.strip().isdigit() and not any(g in ln for g in _GLOO)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job as 2 processes x 2 devices and as 1 process x 4 devices, started together."""
    root = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    t = time.perf_counter()
    with _jobs(600) as (jobs, start):
        for i in range(2):  # each job its own empty $FTJAX_CACHE, not the user's: every base row computed here
            start(f"p{i}", _command(root / "two", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                    f"--process_id={i}", EVERY_ROW), _env(2, FTJAX_CACHE=str(root / "cache_two")), root)
        start("single", _command(root / "one", EVERY_ROW), _env(4, FTJAX_CACHE=str(root / "cache_one")), root)
    print(f"2 x 2 devices and 1 x 4 devices, together: {time.perf_counter() - t:.1f} s")
    for job in jobs:
        assert job.proc.returncode == 0, job.tail()
    return root, {job.name: job for job in jobs}


def test_two_processes_give_the_losses_of_one(runs):
    root, jobs = runs
    two, one = _losses(root / "two"), _losses(root / "one")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        for key in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(two[step][key], one[step][key], rtol=RTOL, err_msg=f"{key} at step {step}")
        assert two[step]["trained_tokens"] == one[step]["trained_tokens"]  # the same global batch
    assert two[STEPS]["eval_loss"] == pytest.approx(one[STEPS]["eval_loss"], rel=RTOL)
    # The final report's rows are split over both processes' devices: it says what one process says.
    reports = {name: json.loads((root / name / "report.json").read_text()) for name in ("two", "one")}
    for part in ("task", "forgetting"):
        flat_two, flat_one = (_flat(reports[name][part]) for name in ("two", "one"))
        assert flat_two == pytest.approx(flat_one, rel=RTOL), part
    assert reports["two"]["samples"] == reports["one"]["samples"]  # the same greedy replies


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"a.b": value} of a nested dict of numbers (None kept), without the measured wall times (TIMED_FIELDS)."""
    from ftjax.evaluation.task import TIMED_FIELDS

    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif key not in TIMED_FIELDS:
            out[prefix + key] = value
    return out


def test_only_process_0_prints_and_both_save_one_checkpoint(runs):
    root, jobs = runs
    assert any(ln.startswith("lora:") for ln in _ours(jobs["p0"].stdout()))
    assert _ours(jobs["p1"].stdout()) == []  # process 1 prints nothing of ours
    assert "step/s" in jobs["p0"].stderr() and "step/s" not in jobs["p1"].stderr()  # one progress bar
    # The checkpoint both processes wrote holds that run's final parameters: restored here (one process, 8
    # devices), they give the eval loss process 0 recorded at the last step.
    from ftjax import data as data_lib
    from ftjax.api import load_tokenizer, model_config
    from ftjax.objectives.held_out import eval_loss, make_eval_loss
    from ftjax.sharding import batch_sharding
    from ftjax.sharding import mesh_from_config
    from ftjax.train.compose import compose, data_spec
    from ftjax.train.setup import build_state

    c = load_config()
    c.mesh.data = -1  # this test process's 8 devices
    mesh = mesh_from_config(c.mesh)
    state = build_state(compose(c), mesh).state
    data = data_lib.build_datasets(data_spec(c), load_tokenizer(c.model.path),
                                   vocab_size=model_config(c.model.path).vocab_size)
    sums = make_eval_loss(state.graphdef, c.train.loss_chunk)
    for name in ("two", "one"):
        ckpt = Checkpoints(root / name)
        assert ckpt.all_steps() == [STEPS]
        restored, meta = ckpt.restore(STEPS, {"trainable": state.trainable, "opt_state": state.opt_state})
        ckpt.close()
        assert meta["step"] == STEPS
        last = _losses(root / name)[STEPS]  # the report's eval loss, over every eval record (EVERY_ROW)
        assert last["eval_loss_examples"] == len(data.eval)
        batches = data_lib.eval_iterator(data.eval, c.train.batch_size, sharding=batch_sharding(mesh))
        got = eval_loss(sums, restored["trainable"], state.frozen, batches)
        # the loop's eval loss vs the report's scoring of the same rows: two code paths, a whole model's tolerance
        assert got == pytest.approx(last["eval_loss"], rel=MODEL_TOL), name



def _export_on_two_processes_and_one(root, tmp_path, *flags):
    """scripts/export.py of the 2-process run on 2 processes (into tmp_path/two) and on one (tmp_path/one)."""
    export = [sys.executable, str(ROOT / "scripts" / "export.py"), f"--workdir={root / 'two'}", *flags]
    port = _free_port()
    with _jobs(300) as (jobs, start):
        for i in range(2):
            start(f"export{i}", [*export, f"--out={tmp_path / 'two'}", f"--coordinator_address=127.0.0.1:{port}",
                                 "--num_processes=2", f"--process_id={i}"], _env(2), tmp_path)
        start("export_single", [*export, f"--out={tmp_path / 'one'}"], _env(4), tmp_path)
    for job in jobs:
        assert job.proc.returncode == 0, job.tail()
    assert "exported step" in jobs[0].stdout() and "exported step" not in jobs[1].stdout()


def test_two_processes_export_what_one_process_exports(runs, tmp_path):
    """scripts/export.py on both hosts of the 2-process run (fsdp-sharded across them, gathered tensor by
    tensor; process 0 writes) gives the bytes one process writes from the same workdir."""
    from safetensors.numpy import load_file

    root, _ = runs
    _export_on_two_processes_and_one(root, tmp_path, "--format=hf")
    two, one = (load_file(tmp_path / name / "model.safetensors") for name in ("two", "one"))
    assert two.keys() == one.keys() and len(one) > 5
    for name in one:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)


def test_a_stop_on_one_host_stops_all_at_one_step_and_resumes_exactly(runs, tmp_path):
    """SIGINT to process 1 only: JAX's preemption sync point picks a step for both; resume ends on the same losses."""
    root, _ = runs
    straight = _losses(root / "two")
    no_report = "--config.eval.final=false"  # the losses are the subject (the fixture's runs check the report)
    jobs = _run_two_processes(tmp_path / "run", tmp_path / "first", no_report, faults=("", "int@1"))
    # process 1 was interrupted (130); process 0 stopped at JAX's preemption sync point (143)
    assert [job.proc.returncode for job in jobs] == [143, 130], jobs[0].tail() + jobs[1].tail()
    said = re.search(r"stop requested: saved step (\d+)", jobs[0].stdout())
    assert said, jobs[0].tail()
    stopped = int(said.group(1))
    assert 1 <= stopped < STEPS and Checkpoints(tmp_path / "run").all_steps() == [stopped]
    jobs = _run_two_processes(tmp_path / "run", tmp_path / "second", no_report)
    for job in jobs:
        assert job.proc.returncode == 0, job.tail()
    assert f"resumed from step {stopped}" in jobs[0].stdout()
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in resumed:
        np.testing.assert_allclose(resumed[step]["loss"], straight[step]["loss"], rtol=RTOL, err_msg=f"step {step}")


def test_a_process_that_never_joins_is_named(tmp_path):
    """Only one of two processes starts: each case ends in one line naming the absent process, near the time-out."""
    timeout = 10
    cases = {"p0-alone": 0, "p1-alone": 1}
    t = time.perf_counter()
    with _jobs(120) as (jobs, start):
        for name, pid in cases.items():
            start(name, _command(tmp_path / name, f"--coordinator_address=127.0.0.1:{_free_port()}",
                                 "--num_processes=2", f"--process_id={pid}", f"--init_timeout={timeout}"),
                  _env(2), tmp_path)
    elapsed = time.perf_counter() - t
    print(f"both failed {elapsed:.1f} s after start (--init_timeout={timeout})")
    expected = {"p0-alone": r"^error: process 1 of 2 did not join within 10 s \(coordinator 127\.0\.0\.1:\d+\)",
                "p1-alone": r"^error: process 0 \(the coordinator at 127\.0\.0\.1:\d+\) did not answer process 1 "
                            r"within 10 s"}
    for job in jobs:
        lines = [ln for ln in job.stderr().splitlines() if ln.strip()]
        assert job.proc.returncode == 2, job.tail()
        assert len(lines) == 1 and re.match(expected[job.name], lines[0]), job.tail()
        assert _ours(job.stdout()) == []
    assert elapsed < timeout + 30


def test_two_processes_export_the_gguf_one_process_exports(runs, tmp_path):
    """--format=gguf on both hosts (each tensor gathered collectively, process 0 writes): the same file bytes."""
    root, _ = runs
    _export_on_two_processes_and_one(root, tmp_path, "--format=gguf", "--quant=q8_0")
    two, one = ((tmp_path / name / "model-q8_0.gguf").read_bytes() for name in ("two", "one"))
    assert len(one) > 100_000 and two == one


def _lost_line(job: Job) -> str:
    """The one line a survivor printed (stderr without the progress bar), no traceback."""
    err = job.stderr()
    assert "Traceback" not in err, job.tail()
    lines = [ln for ln in said(err) if not any(g in ln for g in _GLOO)]
    assert len(lines) == 1, job.tail()
    return lines[0]


def _kill_one(workdir: Path, logs: Path, n: int, victim: int, flags: Sequence[str], devices: int) -> list[Job]:
    """n processes, `victim` killed (kill -9) at the end of step 4; the survivors must exit within 30 s of it,
    at the default --heartbeat_timeout_s."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with _jobs(420) as (jobs, start):
        for i in range(n):
            start(f"p{i}", _command(workdir, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                                    f"--process_id={i}", *flags), _env(devices, fault="kill@4" if i == victim else ""),
                  logs)
        deadline = time.monotonic() + 420
        while jobs[victim].proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        died = time.monotonic()
        for job in jobs:
            job.proc.wait(timeout=max(died + 30 - time.monotonic(), 0.1))  # TimeoutExpired fails the test
    assert jobs[victim].proc.returncode == -9, jobs[victim].tail()
    return jobs


@pytest.mark.parametrize("n,victim", [(2, 1), (3, 2)])
def test_a_killed_process_ends_the_others_in_one_line_and_a_relaunch_resumes(tmp_path, n, victim):
    """kill -9 of one process: each other one names it and the last complete checkpoint in one line, exits 75
    within 30 s; the same command relaunched resumes from that checkpoint to the losses of a straight run."""
    flags = ("--config.eval.final=false", "--config.checkpoint.every=2", "--config.train.steps=6",
             "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1", f"--config.train.batch_size={2 * n}")
    jobs = _kill_one(tmp_path / "run", tmp_path / "killed", n, victim, flags, devices=2)
    for i, job in enumerate(jobs):
        if i == victim:
            continue
        assert job.proc.returncode == 75, job.tail()
        line = _lost_line(job)
        m = re.match(rf"error: process {i}: process {victim} \(\S+\) of {n} was lost \((.+?)\); (.+?); relaunch the "
                     rf"same command on every process to resume from it; details in {tmp_path / 'run' / 'faults.log'}$",
                     line)
        assert m, line
    kept = Checkpoints(tmp_path / "run").latest_step()
    assert (f"the last complete checkpoint is {tmp_path / 'run' / 'checkpoints' / str(kept)} (kept)" if kept else
            "no checkpoint is complete yet") in _lost_line(jobs[0])
    port = _free_port()
    with _jobs(420) as (again, start):
        for i in range(n):
            start(f"again{i}", _command(tmp_path / "run", f"--coordinator_address=127.0.0.1:{port}",
                                        f"--num_processes={n}", f"--process_id={i}", *flags), _env(2), tmp_path)
        start("straight", _command(tmp_path / "straight", *flags), _env(2 * n), tmp_path)
    for job in again:
        assert job.proc.returncode == 0, job.tail()
    if kept:
        assert f"resumed from step {kept}" in again[0].stdout()
    resumed, straight = _losses(tmp_path / "run"), _losses(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    steps = [r["step"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 7))  # each step once
    for step in resumed:
        np.testing.assert_allclose(resumed[step]["loss"], straight[step]["loss"], rtol=RTOL, err_msg=f"step {step}")
