"""Log filters the entry points install (scripts, `ftjax.cli`): Orbax warnings that say nothing to a user."""

from __future__ import annotations

import logging


class _QuietOrbax(logging.Filter):
    """Orbax warns at every save without metrics while best-tracking is on (ours are deliberate) and at every
    read-only open that it ignores the save options (reading is all a reader does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("did not provide metrics" in msg or "read_only=True" in msg or "is read only" in msg)


def quiet_orbax() -> None:
    """Drop those warnings from absl's logger (idempotent)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())
