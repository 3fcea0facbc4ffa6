"""Run a function compiled as in production: conftest's -O0 would hide XLA's fused multiply-adds."""

import jax


def run_optimized(fn, *args):
    """fn(*args) jitted at XLA backend optimization level 2 (FMA contraction on, as outside tests)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 2})(*args)
