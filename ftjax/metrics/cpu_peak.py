"""The CPU's practical peak FLOP/s, measured with one large matmul (no data sheet covers a CPU)."""

from __future__ import annotations

import functools
import time

import numpy as np


@functools.cache
def measured_cpu_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large matmul in `dtype` on the default device (the CPU's practical peak); measured once per
    process (~1 s: a run asks at its start and its end)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / float(np.median(times))
