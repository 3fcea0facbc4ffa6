"""Multi-host agreement: every process must take the same path through sharded computations."""

from __future__ import annotations

import numpy as np


def everywhere(flag: bool) -> bool:
    """True only when every process says True (e.g. all can read a cache), so none skips a collective."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))
