"""The train loop's periodic actions (in the style of CLU's and big_vision's): each looks at one finished
step, a `Tick`, and acts when its schedule says so: evaluate (and stop early), fetch and log metrics,
save a checkpoint. The loop runs them in that order after every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator

import jax

from ftjax.checkpoint import Checkpoints
from ftjax.metrics.step_clock import StepClock, rate_figures
from ftjax.metrics.writer import MetricsWriter
from ftjax.train.early_stop import EarlyStop
from ftjax.train.optimizer import raise_if_diverged


@dataclasses.dataclass
class Tick:
    """One finished step as the actions see it; they add host values and may end the run after it."""

    step: int
    trainable: Any
    opt_state: Any
    metrics: dict  # the step's metrics, still on device
    is_last: bool  # train.steps reached
    stopping: bool  # save and end after this step (a signal, `until`, or early stopping)
    stopped_early: bool = False
    values: dict = dataclasses.field(default_factory=dict)  # what is logged for this step


def due(every: int, step: int) -> bool:
    """A schedule of `every` steps (0 = never)."""
    return bool(every) and step % every == 0


class Meter:
    """A step's metrics fetched to the host (one sync) with tokens/s and MFU since the previous fetch.

    Step time is wall time between step completions: each step waits for the previous one to finish (one
    behind, so the device always has the next step queued), the first window starts when the compiled
    step is first dispatched, and time spent evaluating or saving is not training time (`clock.paused`,
    ftjax/metrics/step_clock.py). Every step's loss stays on device until the fetch, which returns them all
    as `step_losses`."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_total: float, max_consecutive_skips: int,
                 term_names: list[str]):
        self.tokens_per_step, self.flops_per_token, self.peak_total = tokens_per_step, flops_per_token, peak_total
        self.max_consecutive_skips = max_consecutive_skips
        self.extra = [n for n in term_names if n != "loss"] + ["loss_total"]  # the loss terms' own metrics
        self.clock, self.steps = StepClock(), 0
        self.losses: list = []  # this window's per-step losses, on device
        self.compile_s: float | None = None

    def start(self, compile_s: float | None = None) -> None:
        """The clock starts now (after compiling, before the first step is dispatched)."""
        self.clock.start()
        self.steps, self.compile_s = 0, compile_s

    def step_done(self, metrics: dict) -> bool:
        """Count a dispatched step; wait for the one before it. True when that previous step has completed."""
        self.steps += 1
        self.losses.append(metrics["loss"])
        if len(self.losses) >= 2:
            self.losses[-2].block_until_ready()
            return True
        return False

    def fetch(self, metrics: dict) -> dict[str, Any]:
        fetched, losses = jax.device_get((metrics, self.losses))  # waits for this step
        rates = rate_figures(self.steps * self.tokens_per_step, self.clock.lap(), self.flops_per_token,
                             self.peak_total)
        self.steps, self.losses = 0, []
        values = {"loss": float(fetched["loss"]), "lr": float(fetched["lr"]),
                  "grad_norm": float(fetched["grad_norm"]), **rates, "trained_tokens": int(fetched["tokens"]),
                  "skipped_steps": int(fetched["skipped"]), "step_losses": [float(x) for x in losses]}
        if self.compile_s is not None:  # once, on the first logged line
            values["compile_s"], self.compile_s = self.compile_s, None
        values.update({k: float(fetched[k]) for k in self.extra if k in fetched})
        raise_if_diverged(fetched, self.max_consecutive_skips)
        return values


@dataclasses.dataclass
class Evaluate:
    """The eval loss every `every` steps and at the last step (`final`); at the periodic ones also the
    task/forgetting tracking (`track`) and early stopping, which ends the run after this step."""

    every: int
    final: bool
    eval_loss: Callable[[Any], float]  # trainable -> mean eval CE
    early: EarlyStop
    meter: Meter
    track: Callable[[Any, int], dict] | None = None  # (trainable, step) -> values
    status: Callable[[str], Any] = contextlib.nullcontext  # what the train bar says meanwhile (Progress.doing)

    def __call__(self, tick: Tick) -> None:
        periodic = due(self.every, tick.step)
        if not (periodic or (tick.is_last and self.final)):
            return
        with self.meter.clock.paused(tick.metrics):
            with self.status(f"step {tick.step}: eval loss on the held-out data"):
                tick.values["eval_loss"] = self.eval_loss(tick.trainable)
            if periodic and self.early.update(tick.values["eval_loss"]) and not tick.is_last:
                tick.stopped_early = tick.stopping = True
            if periodic and self.track is not None:
                with self.status(f"step {tick.step}: task scores and forgetting"):
                    tick.values.update(self.track(tick.trainable, tick.step))


@dataclasses.dataclass
class LogMetrics:
    """Every `every` steps, at the last step and at a stop: fetch the metrics, write them, show them."""

    every: int
    meter: Meter
    writer: MetricsWriter
    progress: "Progress"
    last: dict = dataclasses.field(default_factory=dict)  # the latest value of every logged key

    def __call__(self, tick: Tick) -> None:
        if self.meter.step_done(tick.metrics):
            self.progress.update(tick.step - 1, self.last)  # the bar moves with every completed step
        if due(self.every, tick.step) or tick.is_last or tick.stopping:
            tick.values = {**self.meter.fetch(tick.metrics), **tick.values}
        if tick.values:
            self.writer.write(tick.step, tick.values)
            self.last.update(tick.values)
            self.progress.update(tick.step, self.last)


@dataclasses.dataclass
class SaveCheckpoint:
    """Every `every` steps, at the last step and at a stop: save trainable + optimizer state with `meta(tick)`."""

    every: int
    ckpt: Checkpoints
    meta: Callable[[Tick], dict]
    clock: StepClock | None = None  # the meter's: a save's copy to the host is not the next step's time

    def __call__(self, tick: Tick) -> None:
        self.ckpt.check()  # a background save that failed (a full disk) stops the run at this step
        if due(self.every, tick.step) or tick.is_last or tick.stopping:
            with self.clock.paused(tick.metrics) if self.clock else contextlib.nullcontext():
                self.ckpt.save(tick.step, {"trainable": tick.trainable, "opt_state": tick.opt_state},
                               self.meta(tick), eval_loss=tick.values.get("eval_loss"))


class Progress:
    """A tqdm bar on process 0: step, loss, tokens/s, ETA; while something else than training holds the step
    (an eval), the bar names it with its own clock (`doing`)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.pos = start
        self.running: tuple[str, float] | None = None  # (what, since) while not training

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """The bar says `what` runs, and for how long, until the block ends (the heartbeat redraws it)."""
        self.running = (what, time.monotonic())
        self.refresh()
        try:
            yield
        finally:
            self.running = None
            if self.bar is not None:
                self.bar.set_description_str("", refresh=True)

    def update(self, step: int, values: dict) -> None:
        if self.bar is None or step < self.pos:
            return
        self.bar.update(step - self.pos)
        self.pos = step
        shown = {"loss": ("loss", ".4f"), "tok/s": ("tokens_per_s", ".0f"), "eval": ("eval_loss", ".4f")}
        post = {name: format(values[key], spec) for name, (key, spec) in shown.items() if key in values}
        self.bar.set_postfix(post)

    def refresh(self) -> None:
        """Redraw (its clock moves): the heartbeat while an eval or a save holds the step."""
        if self.bar is None:
            return
        if self.running is not None:
            what, since = self.running
            self.bar.set_description_str(f"{what} ({time.monotonic() - since:.0f} s)", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
