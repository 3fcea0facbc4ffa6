"""Training time only, for tokens/s and MFU: the clock runs from one fetch to the next, less the host work
done between steps (an eval, a save). That work first waits for the step in hand to finish, so the wait is
the step's own time and only the work after it is set aside: a window never counts another phase's time, and
an eval at the last step cannot shrink that step's time to nothing (an MFU of 24 on the tiny run)."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import jax

MIN_WINDOW_S = 1e-6  # a window shorter than this is a clock's resolution, not a step


class StepClock:
    """Seconds of training since the last `lap()`, with `paused(step_output)` blocks set aside."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        """The clock starts now (after compiling, before the first step is dispatched)."""
        self.t_last, self.paused_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self, step_output: Any) -> Iterator[None]:
        """Set the block's time aside, once `step_output` (the step just dispatched) is ready: the step's
        remaining compute is training time, whichever host work first waits for it."""
        jax.block_until_ready(step_output)
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - begin

    def lap(self) -> float:
        """The training seconds since the previous lap (or `start`), and a new window from now."""
        now = time.perf_counter()
        seconds = max(now - self.t_last - self.paused_s, MIN_WINDOW_S)
        self.t_last, self.paused_s = now, 0.0
        return seconds


def rate_figures(tokens: int, seconds: float, flops_per_token: float, peak_total: float) -> dict[str, float]:
    """tokens_per_s and mfu of a window; an MFU above 1 is impossible, so it is not logged (the peak it was
    divided by is wrong: a data-sheet peak for the wrong dtype, or a CPU peak measured under load)."""
    tps = tokens / seconds
    mfu = tps * flops_per_token / peak_total
    return {"tokens_per_s": tps, **({"mfu": mfu} if mfu <= 1.0 else {})}
