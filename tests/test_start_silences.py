"""No silent start: reading the data and loading the model, bin/demo's longest silences (~25 s each on a loaded
2-core machine), say "... still WHAT (N s)" while they run, and stop saying it when they end."""

from __future__ import annotations

import functools
import time

from ftjax import logs
from ftjax.train import loop
from ftjax.train.compose import compose
from loop_helpers import load_config

BEAT_S = 0.05  # the heartbeat's interval here (15 s in a run)
SLOW_S = 0.5  # each phase held this long: several beats


def _slowed(fn):
    @functools.wraps(fn)
    def slow(*args, **kwargs):
        time.sleep(SLOW_S)
        return fn(*args, **kwargs)

    return slow


def test_reading_the_data_and_loading_the_model_say_they_are_still_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "still", functools.partial(logs.still, every=BEAT_S))
    monkeypatch.setattr(loop, "load_tokenizer", _slowed(loop.load_tokenizer))  # the data phase's first call
    monkeypatch.setattr(loop, "build_state", _slowed(loop.build_state))
    c = load_config()
    c.eval.final = False  # no report: nothing generated before the first step
    loop.prepare(compose(c), tmp_path)
    lines = capsys.readouterr().out.splitlines()
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    fits = next(i for i, line in enumerate(lines) if line.startswith("memory per device"))
    built = next(i for i, line in enumerate(lines) if "trainable parameters" in line)
    reading = [i for i, line in enumerate(lines) if "... still reading the data (" in line]
    loading = [i for i, line in enumerate(lines) if "... still loading the model (" in line]
    assert reading and max(reading) < first_data  # said while it ran, not after
    assert loading and fits < min(loading) and max(loading) < built
