"""What a user watching a job sees besides its own lines: log filters the entry points install (Orbax
warnings that say nothing to a user), and a heartbeat for long silent calls."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator


class _QuietOrbax(logging.Filter):
    """Orbax warns at every save without metrics while best-tracking is on (ours are deliberate) and at every
    read-only open that it ignores the save options (reading is all a reader does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("did not provide metrics" in msg or "read_only=True" in msg or "is read only" in msg)


def quiet_orbax() -> None:
    """Drop those warnings from absl's logger, and send Orbax's errors to the workdir's faults.log (idempotent)."""
    from ftjax.fault_log import OrbaxErrorsToLog

    logger = logging.getLogger("absl")
    for kind in (_QuietOrbax, OrbaxErrorsToLog):
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


@contextlib.contextmanager
def heartbeat(beat: Callable[[], None], every: float = 10.0) -> Iterator[None]:
    """Call `beat` (e.g. a progress bar's refresh, which redraws its clock) every `every` seconds until the
    block ends: one compiled call can run for a minute without a word otherwise."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(every):
            beat()

    thread = threading.Thread(target=run, name="ftjax-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def progress(total: int, unit: str, desc: str) -> Iterator[Any]:
    """A tqdm bar (done / total with a rate) on process 0 that redraws its clock every 10 s while one long
    item runs (a compiled generation batch takes a minute on a CPU); disabled elsewhere or with nothing to do."""
    import jax
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, leave=False, dynamic_ncols=True, mininterval=2.0,
               disable=jax.process_index() != 0 or total == 0)
    with bar, heartbeat(bar.refresh):
        yield bar


@contextlib.contextmanager
def still(what: str, say: Callable[[str], None], every: float = 15.0) -> Iterator[None]:
    """Say "  ... still WHAT (N s)" every `every` seconds while the block runs (an XLA compile of a large step)."""
    start = time.monotonic()
    with heartbeat(lambda: say(f"  ... still {what} ({time.monotonic() - start:.0f} s)"), every):
        yield
