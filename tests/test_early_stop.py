"""Early stopping: the tracker's rule, its round trip through checkpoint metadata, the config checks, and the
training loop stopping, saving and resuming by it (eval losses scripted, so the stop step is known)."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.config import default_config, validate
from ftjax.errors import ConfigError
from ftjax.train.early_stop import EarlyStop
from ftjax.workdir import load_trained


def test_stops_after_patience_evals_without_a_new_best():
    stop = EarlyStop(patience=2)
    losses = [1.0, 0.8, 0.9, 0.8, 0.7, 0.75, 0.71]  # 0.8 again is not an improvement
    decisions = [stop.update(x) for x in losses]
    assert decisions == [False, False, False, True, False, False, True]
    assert stop.best == 0.7 and stop.since_best == 2


def test_nan_counts_as_no_improvement_and_zero_patience_never_stops():
    stop = EarlyStop(patience=1)
    assert not stop.update(1.0) and stop.update(math.nan)
    never = EarlyStop(patience=0)
    assert not any(never.update(x) for x in [1.0, 2.0, 3.0, 4.0])


def test_state_round_trips_through_checkpoint_metadata():
    stop = EarlyStop(patience=3)
    for x in [1.0, 0.5, 0.6]:
        stop.update(x)
    again = EarlyStop.from_state(3, stop.state())
    assert (again.best, again.since_best) == (0.5, 1)
    assert [again.update(x) for x in [0.6, 0.6]] == [False, True]
    fresh = EarlyStop.from_state(3, None)  # a checkpoint written before early stopping existed
    assert fresh.best == math.inf and fresh.since_best == 0
    assert EarlyStop.from_state(3, EarlyStop(3).state()).best == math.inf


def test_patience_needs_periodic_eval():
    c = default_config()
    c.data.train, c.data.eval, c.eval.every = "a.jsonl", "", 0
    c.train.early_stop_patience = 2
    with pytest.raises(ConfigError, match="early_stop_patience needs periodic eval"):
        validate(c)
    c.train.early_stop_patience = -1
    with pytest.raises(ConfigError, match="early_stop_patience must be >= 0"):
        validate(c)


# Scripted eval losses at steps 1, 2, 3, ...: the best is step 2; with patience 2, steps 3 and 4 bring no new
# best, so the run stops after step 4 of 8.
SCRIPT = [2.0, 1.5, 1.6, 1.7, 1.0, 1.0, 1.0, 1.0]
STOP, BEST = 4, 2
SCRIPTED = "sft_scripted_eval"  # SFT whose held-out loss is SCRIPT (registered by the `scripted` fixture)


def _loop_config(final: bool = False):
    from loop_helpers import load_config

    c = load_config()
    c.objective = SCRIPTED
    c.eval.every = 1
    c.eval.final = final
    c.train.log_every = 3  # the stop step (4) is not a logging step: it must be logged all the same
    c.train.early_stop_patience = 2
    c.checkpoint.every = 1  # every step saved: the best (step 2) is kept beside the latest
    return c


class _Script:
    """Hands out SCRIPT in order, one loss per eval, across the runs of one test."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return SCRIPT[self.calls - 1]


@pytest.fixture
def scripted(monkeypatch):
    """An objective whose held-out loss is SCRIPT (SFT otherwise); task tracking skipped and the final report only
    recorded (their cost and contents are tested in test_train_loop and test_evaluation_*, not here)."""
    from ftjax.evaluation.run import Evaluation
    from ftjax.objectives import register_objective
    from ftjax.objectives.sft import Sft

    script = _Script()
    script.reported_steps = []

    class ScriptedEval(Sft):
        name = SCRIPTED

        def held_out(self, graphdef, terms, loss_chunk):
            return lambda trainable, frozen, batches: script()

    register_objective(SCRIPTED, ScriptedEval)
    monkeypatch.setattr(Evaluation, "track", lambda self, *a, **k: {})
    script.reported = []

    def report(self, model, base, step, extra_meta=None):
        script.reported_steps.append(step)
        script.reported.append((extra_meta, jax.device_get(nnx.state(model, nnx.LoRAParam))))

    monkeypatch.setattr(Evaluation, "report", report)
    return script


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_the_loop_stops_saves_logs_and_reports_at_the_stop_step(scripted, tmp_path, capsys):
    from ftjax.checkpoint import Checkpoints
    from ftjax.train.loop import run
    from loop_helpers import metrics

    result = run(_loop_config(final=True), tmp_path)
    out = capsys.readouterr().out
    assert result["step"] == STOP and result["stopped_early"]
    assert f"early stopping: no lower eval loss in 2 evals (best 1.5000); saved step {STOP}" in out
    records = metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [3, STOP]
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == SCRIPT[:STOP]
    ckpt = Checkpoints(tmp_path, keep_best=True)
    assert ckpt.latest_step() == STOP and ckpt.best_step() == BEST
    assert ckpt.read_meta(STOP)["early_stop"] == {"best": 1.5, "since_best": 2}
    ckpt.close()
    # the final report runs on an early-stopped run too, on the best checkpoint's weights (what export takes)
    extra = scripted.reported[0][0]  # the run's last step, and its wall time for report.md
    assert scripted.reported_steps == [BEST] and set(extra) == {"final_step", "run"}
    assert extra["final_step"] == STOP and set(extra["run"]) == {"wall_s"} and extra["run"]["wall_s"] > 0
    assert f"report: the best checkpoint, step {BEST} (lowest eval loss), not the final step {STOP}" in out
    reported = jax.tree.leaves(scripted.reported[0][1])
    for which, same in ((BEST, True), (STOP, False)):
        saved = jax.tree.leaves(nnx.state(load_trained(tmp_path, which).model, nnx.LoRAParam))
        assert all(np.array_equal(a, b) for a, b in zip(reported, saved)) == same, which


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_a_resumed_run_stops_where_a_straight_run_does(scripted, tmp_path, capsys):
    from ftjax.checkpoint import Checkpoints
    from ftjax.train.loop import run

    run(_loop_config(), tmp_path, until=3)  # saved with one eval since the best
    assert scripted.calls == 3  # the resumed run's first eval is step 4's
    capsys.readouterr()
    result = run(_loop_config(), tmp_path)
    assert "resumed from step 3" in capsys.readouterr().out
    assert result["step"] == STOP and result["stopped_early"]
    again = run(_loop_config(), tmp_path)  # an early-stopped run does not train on when started again
    assert "early stopping had ended this run" in capsys.readouterr().out
    assert again["step"] == STOP
    ckpt = Checkpoints(tmp_path)
    assert ckpt.latest_step() == STOP
    ckpt.close()
