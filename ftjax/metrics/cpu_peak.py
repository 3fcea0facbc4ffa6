"""The CPU's practical peak FLOP/s, measured with one large matmul (no data sheet covers a CPU)."""

from __future__ import annotations

import time

_BEST: dict[tuple[str, int], float] = {}  # the fastest matmul timed so far in this process, per (dtype, n)


def _fastest_matmul(dtype: str, n: int, reps: int) -> float:
    """FLOP/s of the fastest of `reps` n x n matmuls: the least disturbed one on a machine other jobs share."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def measured_cpu_peak(dtype: str = "float32", n: int = 2048, reps: int = 5, *, again: bool = False) -> float:
    """The CPU's practical peak: the fastest large matmul timed in this process (~1 s the first time). `again`
    times another round first; a peak only rises, so one timed while other jobs held the cores is replaced."""
    key = (dtype, n)
    if again or key not in _BEST:
        _BEST[key] = max(_BEST.get(key, 0.0), _fastest_matmul(dtype, n, reps))
    return _BEST[key]
