"""Peak FLOP/s per device, the denominator of MFU: data-sheet numbers, else the measured CPU peak."""

from __future__ import annotations

from ftjax.metrics.cpu_peak import measured_cpu_peak

# Dense bf16 peak FLOP/s per chip, from vendor data sheets (no sparsity).
ACCELERATOR_PEAKS = {
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(dtype: str = "float32", *, again: bool = False) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the table for known accelerators, else measured (`again`:
    time the CPU's matmul once more, keeping the fastest)."""
    import jax

    kind = jax.devices()[0].device_kind
    for name, peak in ACCELERATOR_PEAKS.items():
        if name.lower() in kind.lower():
            return peak, f"{kind}: data-sheet dense bf16 peak"
    return measured_cpu_peak(dtype, again=again), f"{kind}: measured {dtype} matmul 2048^3 (fastest timed)"


def possible_mfu(flops_per_s: float, peak: float) -> tuple[float | None, str | None]:
    """(MFU, None) when it is possible; (None, why) above 1, where the peak is wrong: a CPU's timed while other
    jobs held the cores, or a data-sheet figure for another dtype."""
    mfu = flops_per_s / peak
    if mfu <= 1.0:
        return mfu, None
    return None, (f"not measured: the steps ran at {mfu:.0%} of the peak, which was timed under more load than "
                  "they were; rerun on a quiet machine")
