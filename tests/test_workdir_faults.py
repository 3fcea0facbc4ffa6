"""The workdir's own fault handling, in this process: one holder at a time (and the OS frees the lock), a workdir
that is a file, one history after a resume (metrics.jsonl and the TensorBoard events cut back, the rest kept
aside), and the stop line of a run that saved nothing."""

from __future__ import annotations

import json
import time

import pytest

from ftjax import workdir_lock
from ftjax.errors import ConfigError, FtjaxError
from ftjax.history_cut import cut_history
from ftjax.metrics.writer import MetricsWriter
from loop_helpers import metrics, tensorboard_scalars


def test_a_held_workdir_refuses_a_second_holder_until_released(tmp_path):
    import os

    with workdir_lock.held(tmp_path / "run"):
        assert workdir_lock.holder(tmp_path / "run").startswith(f"pid {os.getpid()} on ")
        with pytest.raises(workdir_lock.WorkdirLocked, match=rf"^{tmp_path / 'run'} is in use by another run "
                                                              rf"\(pid {os.getpid()} on \S+, started \S+\); wait"):
            with workdir_lock.held(tmp_path / "run"):
                pass
    assert workdir_lock.holder(tmp_path / "run") is None  # released: the next run takes it
    with workdir_lock.held(tmp_path / "run"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"is a file, not a folder"):
        with workdir_lock.held(tmp_path / "file"):
            pass


def test_a_resume_cuts_the_history_back_and_keeps_the_rest_aside(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": 10.0 - step})
    writer.close()
    line = cut_history(tmp_path, 3)
    assert line == (f"2 rows of {tmp_path / 'metrics.jsonl'} logged after step 3, the checkpoint this run resumes "
                    "from, moved to metrics.cut.jsonl (and tensorboard.cut/)")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    cut = [json.loads(ln) for ln in (tmp_path / "metrics.cut.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in cut] == [(4, 6.0), (5, 5.0)]
    assert tensorboard_scalars(tmp_path)["loss"] == {1: 9.0, 2: 8.0, 3: 7.0}  # the records kept, CRCs intact
    time.sleep(1.1)  # a resumed run's event file is named by its start second: a later one, as a real resume's
    writer = MetricsWriter(tmp_path)  # the resumed run logs on: one curve
    writer.write(4, {"loss": 1.0})
    writer.close()
    assert tensorboard_scalars(tmp_path)["loss"] == {1: 9.0, 2: 8.0, 3: 7.0, 4: 1.0}
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert cut_history(tmp_path, 4) == ""  # nothing after the resumed step: nothing said
    assert "this run starts over" in cut_history(tmp_path, 0)
    assert metrics(tmp_path) == []


def test_a_stop_before_the_first_save_says_that_the_same_command_starts_over(tmp_path):
    from ftjax import cli

    with workdir_lock.held(tmp_path / "run"):
        pass
    assert cli._what_next().startswith(f": nothing was saved in {tmp_path / 'run'}; the same command starts over: ")
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    assert cli._what_next().startswith(". To finish the job, run: ")


def test_what_threads_outside_python_print_goes_to_the_workdirs_log(tmp_path):
    import _thread
    import io
    import threading

    from ftjax.fault_log import NAME, ForeignThreadStderr

    screen = io.StringIO()
    stderr = ForeignThreadStderr(screen)
    with workdir_lock.held(tmp_path):
        done = threading.Event()

        def foreign() -> None:  # a thread Python did not start (tensorstore's C++ callbacks are such)
            stderr.write("Traceback (most recent call last):\nRuntimeError: Event loop is closed\n")
            done.set()

        _thread.start_new_thread(foreign, ())
        assert done.wait(10)
        stderr.write("error: the one line\n")
    assert screen.getvalue() == "error: the one line\n"
    assert "RuntimeError: Event loop is closed" in (tmp_path / NAME).read_text()


@pytest.mark.parametrize("mistake", ["missing data", "malformed JSONL", "missing model"])
def test_a_refused_start_leaves_no_workdir_behind(tmp_path, mistake):
    """A start stopped by bad input removes the workdir it created (it holds only the lock); one that already
    existed stays, as it was."""
    from ftjax.train.loop import run
    from loop_helpers import load_config

    c = load_config()
    if mistake == "missing data":
        c.data.train = str(tmp_path / "no_such.jsonl")
    elif mistake == "malformed JSONL":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
        c.data.train = str(tmp_path / "bad.jsonl")
    else:
        c.model.path = str(tmp_path / "no_such_model")
    for workdir in (tmp_path / "runs" / "new", tmp_path / "existing"):
        existed = workdir.name == "existing"
        if existed:
            workdir.mkdir()
        with pytest.raises(FtjaxError):  # a one-line error, exit 2 from the script
            run(c, workdir)
        assert workdir.exists() == existed and (not existed or list(workdir.iterdir()) == [])
    assert (tmp_path / "runs").is_dir()  # the parent it made is left: only the workdir is the run's
