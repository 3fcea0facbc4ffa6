"""Peak FLOP/s per device, the denominator of MFU: data-sheet numbers, else the measured CPU peak."""

from __future__ import annotations

from ftjax.metrics.cpu_peak import measured_cpu_peak

# Dense bf16 peak FLOP/s per chip, from vendor data sheets (no sparsity).
ACCELERATOR_PEAKS = {
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the table for known accelerators, else measured."""
    import jax

    kind = jax.devices()[0].device_kind
    for name, peak in ACCELERATOR_PEAKS.items():
        if name.lower() in kind.lower():
            return peak, f"{kind}: data-sheet dense bf16 peak"
    return measured_cpu_peak(dtype), f"{kind}: measured {dtype} matmul 2048^3"
