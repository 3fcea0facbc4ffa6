"""A requested stop: raised at the next safe point with the phase it interrupted, documented exit codes."""

import os
import signal

import pytest

from ftjax import stop


def test_a_signal_is_honoured_at_the_next_safe_point_naming_the_phase():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or what the process had (an xdist worker's)
    with stop.listening():
        stop.safe_point()  # nothing asked: nothing happens
        with stop.phase("the final report"):
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets the flag: no KeyboardInterrupt here
            with pytest.raises(stop.StopRequested) as e:
                stop.safe_point("step 40 saved")
    assert str(e.value) == "stopped by SIGINT during the final report; step 40 saved"
    assert stop.exit_code(e.value.signum) == 130 and stop.exit_code(signal.SIGTERM) == 143
    assert stop.exit_code(signal.SIGTERM, override=0) == 0
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_second_ctrl_c_interrupts_at_once():
    with stop.listening():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_heard_by_one_job_does_not_stop_the_next():
    with stop.listening():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
    with stop.listening():
        stop.safe_point()  # the next job starts clean
    assert stop.requested() is None
