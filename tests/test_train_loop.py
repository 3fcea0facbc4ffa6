"""The training job end to end on the tiny config: records, exact resume, provenance, preemption, crashes."""

import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftjax.checkpoint import Checkpoints
from ftjax.errors import ConfigError
from ftjax.metrics.writer import read_metrics
from ftjax.train.loop import run
from loop_helpers import ROOT, load_config, metrics, script_env, tensorboard_scalars

STEPS = 8


def _config(final_eval: bool = False, **train):
    c = load_config()
    c.eval.final = final_eval  # the report is checked once, on the straight run
    c.train.grad_accum = 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # 8 simulated devices, every kind of axis
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


@pytest.fixture(scope="module")
def built():
    """The runs' state built once (2 x 2 x 2 mesh): the restore target of their checkpoints, the model's structure."""
    from ftjax.sharding import mesh_from_config
    from ftjax.train.compose import compose
    from ftjax.train.setup import build_state

    c = _config()
    return build_state(compose(c), mesh_from_config(c.mesh))


def _final_trainable(workdir, built):
    ckpt = Checkpoints(workdir)
    step = ckpt.latest_step()
    state, meta = ckpt.restore(step, {"trainable": built.state.trainable, "opt_state": built.state.opt_state})
    ckpt.close()
    return step, jax.device_get(state["trainable"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    result = run(_config(final_eval=True), workdir)
    return workdir, result


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_records_hold_the_runs_values(straight):
    workdir, result = straight
    records = read_metrics(workdir)  # a step's lines merged: the last step's, then the report's eval loss at it
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    for r in records:
        if "loss" in r:
            assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
            assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert records[-1]["loss"] == pytest.approx(result["loss"], rel=0, abs=0)
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert any("eval_loss" in r for r in records)
    tb = tensorboard_scalars(workdir)
    for r in records:
        for key in ("loss", "lr", "grad_norm", "eval_loss"):
            if key in r:
                assert tb[key][r["step"]] == pytest.approx(r[key], rel=1e-6)
    import json

    report = json.loads((workdir / "report.json").read_text())
    for which in ("base", "prompted", "finetuned"):
        assert {"exact", "json_valid", "eval_loss"} <= set(report["task"][which])
    assert report["task"]["finetuned"]["eval_loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-4)
    assert {"kl_to_base", "retain_nll_base", "retain_nll_finetuned"} <= set(report["forgetting"])
    assert report["forgetting"]["kl_to_base"] > 0
    png = (workdir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # bin/demo and scripts/eval.py name progress.png: written with eval.every=0 too (the final eval's point)
    assert (workdir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_every_logged_rate_is_possible(straight):
    """The last step (its save first waits for it; the report then measures its eval loss) and the step after a
    save are timed by their own time: no MFU above 1, no tokens/s above twice the run's median (a loop eval at the
    last step: test_live_figures)."""
    workdir, _ = straight
    records = [r for r in read_metrics(workdir) if "tokens_per_s" in r]
    assert records[-1]["step"] == STEPS and "eval_loss" in records[-1]
    median = float(np.median([r["tokens_per_s"] for r in records]))
    for r in records:
        assert "mfu" in r and 0 < r["mfu"] <= 1, r
        assert r["tokens_per_s"] <= 2 * median, (r["step"], r["tokens_per_s"], median)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_resume_is_bitwise_identical(straight, built, tmp_path, capsys):
    workdir, _ = straight
    run(_config(), tmp_path, until=4)
    capsys.readouterr()
    run(_config(), tmp_path)
    assert "resumed from step 4" in capsys.readouterr().out
    losses = {r["step"]: r["loss"] for r in metrics(tmp_path) if "loss" in r}
    expected = {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}
    assert losses == expected  # same floats, including the order of data
    step_a, a = _final_trainable(workdir, built)
    step_b, b = _final_trainable(tmp_path, built)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_on_changed_data_is_refused(tmp_path):
    c = _config()
    train = tmp_path / "train.jsonl"
    train.write_text(open(c.data.train).read())
    c.data.train = str(train)
    run(c, tmp_path / "run", until=2)
    with open(train, "a") as f:
        f.write(open(c.data.eval).readline())
    with pytest.raises(ConfigError, match="training data changed"):
        run(c, tmp_path / "run")


MESH8 = ("--config.train.grad_accum=2", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")


def _train_subprocess(workdir, fault: str, *flags: str, mesh: tuple[str, ...] = MESH8) -> subprocess.CompletedProcess:
    """scripts/train.py on the straight run's 8-device mesh, or on one device (`mesh=()`: a run whose subject is not
    the mesh)."""
    env = script_env(8 if mesh else 1, fault)
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
           f"--workdir={workdir}", *mesh, "--config.eval.final=false", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_sigterm_saves_the_current_step_and_exits_143_with_the_command_that_finishes(tmp_path):
    proc = _train_subprocess(tmp_path, "term@3", "--config.checkpoint.every=100", mesh=())
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "stop requested: saved step 3" in proc.stdout
    assert Checkpoints(tmp_path).all_steps() == [3]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith("stopped by SIGTERM during training; step 3 saved. To finish the job, run: ")
    assert f"--workdir={tmp_path}" in last
    proc = _train_subprocess(tmp_path / "other", "term@2", "--config.checkpoint.every=100", "--stop_exit_code=0",
                             mesh=())
    assert proc.returncode == 0, proc.stderr[-2000:]  # schedulers that want a stop to count as success


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_sigkill_then_resume_ends_at_the_same_loss(straight, tmp_path):
    workdir, result = straight
    proc = _train_subprocess(tmp_path, "kill@5", "--config.checkpoint.every=2")
    assert proc.returncode == -signal.SIGKILL
    latest = Checkpoints(tmp_path).latest_step()
    assert latest in (2, 4)  # the async save of step 4 may have been cut off: then it is absent, not partial
    proc = _train_subprocess(tmp_path, "")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from step {latest}" in proc.stdout
    final = [r for r in metrics(tmp_path) if "loss" in r][-1]
    assert final["step"] == STEPS and final["loss"] == result["loss"]


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_load_model_reads_a_workdir(straight, built):
    import ftjax
    from flax import nnx

    workdir, _ = straight
    step, trainable = _final_trainable(workdir, built)
    by_hand = nnx.merge(built.state.graphdef, trainable, built.state.frozen)
    ids = np.array([[1, 5, 9, 200, 3000]])
    np.testing.assert_array_equal(np.asarray(ftjax.load_model(workdir)(ids)), np.asarray(by_hand(ids)))
    assert ftjax.load_tokenizer(workdir).vocab_size == ftjax.load_tokenizer("tiny-random-llama").vocab_size
