"""Where adapters attach to a model and how its projections apply them: the seam that `ftjax.lora` fills.

The model names its attach points (`Linear.lora`; the experts' `Experts.ADAPTED` weights: names kept as the
adapters' paths in saved checkpoints) and owns the checkpoint name of an adapter's low-rank hidden
(`ADAPTER_HIDDEN`, which the remat policies save); it never reads an adapter's parameters by name, only
through the `Adapter` interface below.
"""

from __future__ import annotations

from typing import Protocol

import jax

ADAPTER_HIDDEN = "adapter_hidden"  # checkpoint name of x @ A, the rank-r hidden of a low-rank adapter


class Adapter(Protocol):
    """An additive update of a projection's output, applied by the projection that holds it."""

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The update for rows x [N, in] -> [N, out]; `rng` (training) draws the adapter's own dropout."""
        ...

    def low_rank(self, dtype, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, float] | None:
        """(A [..., in, r], B [..., r, out], scale) in `dtype` when this call's update is exactly
        x @ A @ B · scale (several such adapters then run as one GEMM), else None (e.g. dropout drawn)."""
        ...
