"""Early stopping: the tracker's rule, its round trip through checkpoint metadata, and the config checks."""

import math

import pytest

from ftjax.config import default_config, validate
from ftjax.errors import ConfigError
from ftjax.train.early_stop import EarlyStop


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
