"""The value tables bitsandbytes quantizes to: NF4 (4-bit) and the signed 8-bit dynamic map."""

from __future__ import annotations

import functools

import numpy as np

# QLoRA's NormalFloat4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (index 7);
# the float32 values bitsandbytes hard-codes (get_4bit_type("nf4")).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU, value for value.

    torch's CPU kernel counts up from `start` for the first half and down from `end` for the
    second, each as one fused multiply-add (one rounding); the float64 product is exact here.
    """
    f = np.float32
    lo, hi = f(start), f(end)
    step = f((hi - lo) / f(steps - 1))
    k = np.arange(steps)
    up = (np.float64(lo) + np.float64(step) * k).astype(f)
    down = (np.float64(hi) - np.float64(step) * (steps - k - 1)).astype(f)
    return np.where(k < steps // 2, up, down)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map()` (signed, 7 exponent bits, 8 bits): 256 sorted float32 values.

    The code double quantization stores NF4's block scales in (Dettmers 2016, "8-bit approximations").
    """
    values: list[np.ndarray] = []
    for i in range(7):
        bounds = _torch_linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += [scaled, -scaled]
    table = np.sort(np.concatenate(values + [np.array([0.0, 1.0], np.float32)]))
    assert table.shape == (256,)
    return table
