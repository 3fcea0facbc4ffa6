"""The step clock behind tokens/s and MFU: host work after a step (an eval, a save) is set aside, but the
step's own compute, which that work first waits for, is not; an impossible MFU is never logged."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.metrics.step_clock import StepClock, rate_figures

STEP_S, EVAL_S = 0.4, 2.0  # a step held on the device by a sleep, then host work five times as long


def _slow_step(x):
    def host(v):
        time.sleep(STEP_S)
        return np.asarray(v, np.float32)

    return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32), x)


def test_paused_work_is_set_aside_but_the_step_it_waits_for_is_not():
    step = jax.jit(_slow_step)
    step(jnp.zeros((), jnp.float32)).block_until_ready()  # compiled before the clock starts
    clock = StepClock()
    out = step(jnp.ones((), jnp.float32))  # dispatched: still running when the "eval" starts
    with clock.paused(out):
        time.sleep(EVAL_S)
    seconds = clock.lap()
    assert STEP_S <= seconds < EVAL_S  # the step's time counted, the eval's not
    assert clock.lap() < STEP_S  # a lap starts a new window


def test_an_mfu_above_one_is_not_logged():
    assert rate_figures(1000, 2.0, 6.0, 6000.0) == {"tokens_per_s": 500.0, "mfu": 0.5}
    assert rate_figures(1000, 0.1, 6.0, 6000.0) == {"tokens_per_s": pytest.approx(10000.0)}
