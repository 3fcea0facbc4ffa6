"""A requested stop (SIGINT, SIGTERM) at any phase of a job: finish the unit of work in hand, keep what
is done, print one line with the command that finishes the job, exit 130 (SIGINT) / 143 (SIGTERM).

Training checks at every step end (and saves); evaluation, the report, export and sampling check between
batches through `safe_point()`. On several processes every process checks at the same points and
they agree (an all-gather of the flag), so all stop at the same batch. Schedulers that want a stopped job
to count as succeeded pass --stop_exit_code=0.

Tests reach into these points through one hook (`install_hook`): it hears every phase entered and every
step ended, which is where the crash / preemption tests signal the process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from typing import Callable, Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequested(Exception):
    """Raised at a safe point after SIGINT / SIGTERM; the entry point turns it into one line and an exit code."""

    def __init__(self, signum: int, phase: str, saved: str = ""):
        self.signum, self.phase, self.saved = signum, phase, saved
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} during {phase}" + (f"; {saved}" if saved else ""))


class _State:
    signum: int | None = None
    installed: int = 0
    phase: str = "the job"
    hook: Callable[[int | str], None] | None = None


_STATE = _State()


def _handle(signum, frame) -> None:
    if _STATE.signum is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
    _STATE.signum = signum
    if _multi_process() and signum == signal.SIGINT:
        # The training loop stops all hosts at one step through JAX's preemption notifier, which listens
        # for SIGTERM: hand the Ctrl-C to it as well.
        os.kill(os.getpid(), signal.SIGTERM)


def _multi_process() -> bool:
    """Several processes joined by jax.distributed (asked without starting JAX's backend, which
    jax.distributed.initialize must come before)."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Install the stop handlers for the block (nested uses share one installation). On several
    processes jax.distributed.initialize (later) hands SIGTERM to JAX's preemption notifier, which the
    training loop consults."""
    previous = {}
    if _STATE.installed == 0:
        _STATE.signum = None
        for sig in EXIT_CODES:
            previous[sig] = signal.signal(sig, _handle)
    _STATE.installed += 1
    try:
        yield
    finally:
        _STATE.installed -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _STATE.installed == 0:
            _STATE.signum = None  # a stop belongs to the job that heard it, not to the next one


def requested() -> int | None:
    """The signal that asked for a stop on this process, or None."""
    return _STATE.signum


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop as a signal would (tests, and a training loop that stops for JAX's preemption notice)."""
    _STATE.signum = signum


def agreed() -> int | None:
    """The stop signal any process received (all processes must call this at the same point), or None."""
    mine = _STATE.signum or 0
    if not _multi_process():
        return mine or None
    import numpy as np
    from jax.experimental import multihost_utils

    seen = np.asarray(multihost_utils.process_allgather(np.int32(mine)))
    found = int(seen.max())
    if found and not _STATE.signum:
        _STATE.signum = found
    return found or None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Name the phase that a stop inside the block interrupts (the one-line message says it); a phase
    inside another reads "outer, inner"."""
    outer = _STATE.phase
    _STATE.phase = name if outer == _State.phase else f"{outer}, {name}"
    _reached(name)
    try:
        yield
    finally:
        _STATE.phase = outer


def safe_point(saved: str = "") -> None:
    """A safe point: raise StopRequested if a stop was asked for on any process."""
    signum = agreed()
    if signum:
        raise StopRequested(signum, _STATE.phase, saved)


def after_step(step: int) -> bool:
    """Whether to stop after this step: a signal here, or on any host at JAX's preemption sync point."""
    _reached(step)
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)
    return requested() is not None


def resume_command() -> str:
    """The command line that ran this job, with the interpreter that ran it and its own flags (`-X`, `-u`):
    running it again, as printed, finishes what the stop left."""
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.orig_argv[1:]])


def exit_code(signum: int, override: int | None = None) -> int:
    return override if override is not None else EXIT_CODES.get(signal.Signals(signum), 128 + int(signum))


def install_hook(hook: Callable[[int | str], None] | None) -> None:
    """Tests' one way in: `hook(point)` is called with each phase's name as it is entered and each step's
    number as it ends (None removes it)."""
    _STATE.hook = hook


def _reached(point: int | str) -> None:
    if _STATE.hook is not None:
        _STATE.hook(point)
