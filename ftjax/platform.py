"""Which accelerator a run targets, read from the devices of its mesh (not from the process's default backend).

A CPU process holding a mesh of abstract TPU devices (jax.experimental.topologies) compiles for TPU, so every
choice that depends on the chip (kernels, `auto` values, memory capacity) asks this module about the mesh.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import numpy as np

from ftjax.errors import ConfigError

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's data-sheet figures: HBM bytes, HBM bandwidth (bytes/s), dense bf16 FLOP/s, and its
    TensorCores (a JAX device is one core, or the whole chip on megacore chips)."""

    hbm_bytes: int
    hbm_bandwidth: float
    peak_flops: float
    cores: int
    source: str


# Keyed by jax's device_kind. v2-v4 abstract topology devices are single cores (2 per chip); v5p's are megacore.
CHIPS: dict[str, Chip] = {
    "TPU v2": Chip(16 * GIB, 700e9, 45e12, 2, "cloud.google.com/tpu/docs/v2: 16 GiB HBM, 700 GB/s, 45 TFLOP/s"),
    "TPU v3": Chip(32 * GIB, 900e9, 123e12, 2, "cloud.google.com/tpu/docs/v3: 32 GiB HBM, 900 GB/s, 123 TFLOP/s"),
    "TPU v4": Chip(32 * GIB, 1228e9, 275e12, 2, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1228 GB/s, 275 TFLOP/s"),
    "TPU v5 lite": Chip(16 * GIB, 819e9, 197e12, 1, "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 819 GB/s, "
                        "197 TFLOP/s"),
    "TPU v5": Chip(95 * GIB, 2765e9, 459e12, 2, "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 2765 GB/s, "
                   "459 TFLOP/s"),
    "TPU v6 lite": Chip(32 * GIB, 1640e9, 918e12, 1, "cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 1640 GB/s, "
                        "918 TFLOP/s"),
}


def devices_of(where: Any = None) -> list:
    """The devices of a Mesh, a sequence of devices or one device; None: the process's devices."""
    if where is None:
        return jax.devices()
    if hasattr(where, "devices") and hasattr(where, "axis_names"):  # Mesh
        return list(where.devices.flat)
    if hasattr(where, "platform"):
        return [where]
    return list(where)


def platform_of(where: Any = None) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices of `where` (a mesh, devices; None: the process's)."""
    platform = devices_of(where)[0].platform
    return _ALIASES.get(platform, platform)


def device_kind(where: Any = None) -> str:
    """jax's device_kind of `where`'s devices, e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3', 'cpu'."""
    return devices_of(where)[0].device_kind


def chip(where: Any = None) -> Chip | None:
    """The data-sheet figures of one device of `where` (a chip's, or its share for a single-core device); None for
    a kind not in CHIPS (CPUs; GPUs, whose runtime reports their memory)."""
    device = devices_of(where)[0]
    spec = CHIPS.get(device.device_kind)
    if spec is None:
        return None
    share = min(getattr(device, "num_cores", spec.cores) / spec.cores, 1.0)
    return Chip(int(spec.hbm_bytes * share), spec.hbm_bandwidth * share, spec.peak_flops * share,
                max(int(spec.cores * share), 1), spec.source)


def device_capacity(where: Any = None) -> tuple[int, str]:
    """(bytes usable per device, where that number came from): the runtime's limit for real local devices, the
    chip table for abstract ones (a topology compiled for on another host), else host RAM shared by the devices."""
    devices = devices_of(where)
    local = [d for d in devices if d in set(jax.local_devices())]  # abstract devices are nobody's local ones
    device = (local or devices)[0]
    stats = (device.memory_stats() or {}) if local else {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), "device memory"
    known = chip(device)
    if known is not None:
        return known.hbm_bytes, f"{device.device_kind} HBM ({known.source})"
    if not local:
        raise ConfigError(f"no HBM figure for {device.device_kind} devices (ftjax/platform.py CHIPS knows "
                          f"{', '.join(CHIPS)})")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(jax.local_device_count(), 1), "host RAM / local devices"


def topology_devices(name: str) -> list:
    """The abstract devices of a TPU slice named as libtpu names it (`v5e:2x2`, `v5p:2x2x1`, `v6e:8x8`), for
    compiling on any host (no TPU needed); ConfigError naming the problem for a name libtpu refuses."""
    quiet_tpu_probe()
    from jax.experimental import topologies

    dims = name.partition(":")[2].split("x")
    kwargs = {}
    if all(d.isdigit() for d in dims) and int(np.prod([int(d) for d in dims])) < 4:  # below one host's 2x2x1
        kwargs["chips_per_host_bounds"] = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu missing, or its long INVALID_ARGUMENT: one line
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--topology={name}: {why} (names like v5e:2x2, v5p:2x2x1, v6e:8x8; needs libtpu: "
                          "pip install -e '.[tpu]')") from None


def quiet_tpu_probe() -> None:
    """On a host without TPU chips, tell libtpu (installed by the `tpu` extra) so its probe at JAX's backend start
    prints no errors and several processes may compile for TPU at once; a TPU VM (with /dev/accel* or /dev/vfio devices) is left to its metadata server."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard with libtpu's lockfile
