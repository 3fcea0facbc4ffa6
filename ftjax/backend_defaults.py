"""What `auto` means for model.attention, model.dtype, train.frozen_dtype and model.remat, per backend.

CPU keeps the values it was tuned with (benchmarks/RESULTS.md). GPU and TPU compute in bf16 with
bf16 frozen weights (the trainable master weights stay in model.param_dtype, fp32) and a kernel
attention. GPU remat `none`: the H200 table of issue 14 (Llama-3.2-1B shape, batch 8 x 2048) was
measured with it, at 27-49 GiB peak of 141 GiB, and it recomputes nothing; a run that does not fit is
told by the memory check to use minimal/full. TPU remat `minimal`: TPU HBM is 16-95 GiB per chip;
it keeps the projection outputs (the matmuls) and recomputes only element-wise work and attention.
"""

from __future__ import annotations

from typing import Any

from ftjax.platform import platform_of

AUTO = "auto"
KEYS = ("model.attention", "model.dtype", "train.frozen_dtype", "model.remat")
DEFAULTS: dict[str, dict[str, str]] = {
    "cpu": {"model.attention": "xla", "model.dtype": "float32", "train.frozen_dtype": "float32",
            "model.remat": "minimal"},
    "gpu": {"model.attention": "cudnn", "model.dtype": "bfloat16", "train.frozen_dtype": "bfloat16",
            "model.remat": "none"},
    "tpu": {"model.attention": "splash", "model.dtype": "bfloat16", "train.frozen_dtype": "bfloat16",
            "model.remat": "minimal"},
}


def backend_defaults(backend: str | None = None) -> dict[str, str]:
    """The `auto` values for `backend` ('cpu', 'gpu', 'tpu'; default: the process's, ftjax.platform; unknown
    backends get CPU's). A run that has its mesh passes platform_of(mesh)."""
    if backend is None:
        backend = platform_of(None)
    return DEFAULTS.get(backend, DEFAULTS["cpu"])


def resolve_auto(config: Any, backend: str | None = None) -> Any:
    """Replace every `auto` among KEYS in the run config by this backend's value, in place (idempotent):
    the saved config.json then records what ran."""
    chosen = None
    for key in KEYS:
        group, leaf = key.split(".")
        if config[group][leaf] == AUTO:
            chosen = chosen or backend_defaults(backend)
            config[group][leaf] = chosen[key]
    return config
