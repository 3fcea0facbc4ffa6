"""ftjax.platform: the accelerator is the mesh's devices' (their platform, kind and HBM), not the process's."""

import dataclasses

import jax
import pytest

from ftjax.errors import ConfigError
from ftjax.platform import CHIPS, GIB, chip, device_capacity, device_kind, platform_of
from ftjax.sharding import active_platform, activation_sharding, make_mesh


@dataclasses.dataclass(frozen=True)
class AbstractDevice:
    """What jax's compile-only topology devices expose (no memory_stats: they belong to no local client)."""

    platform: str
    device_kind: str
    num_cores: int = 1


def test_platform_of_a_mesh_is_its_devices():
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    assert platform_of(mesh) == "cpu" == platform_of(jax.devices()[:1]) == platform_of(jax.devices()[0])
    assert device_kind(mesh) == jax.devices()[0].device_kind
    assert platform_of([AbstractDevice("cuda", "NVIDIA H100 80GB HBM3")]) == "gpu"
    with activation_sharding(mesh):
        assert active_platform() == "cpu"


def test_chip_figures_are_per_device():
    """A megacore v5p device is the whole chip; a single-core v4 device (2 per chip) gets half of its chip."""
    v5p = chip([AbstractDevice("tpu", "TPU v5", num_cores=2)])
    assert (v5p.hbm_bytes, v5p.peak_flops) == (CHIPS["TPU v5"].hbm_bytes, CHIPS["TPU v5"].peak_flops)
    v4 = chip([AbstractDevice("tpu", "TPU v4", num_cores=1)])
    assert (v4.hbm_bytes, v4.hbm_bandwidth, v4.peak_flops) == (16 * GIB, 614e9, 137.5e12)
    assert chip(jax.devices()) is None


def test_capacity_of_abstract_tpu_devices_is_their_hbm_not_host_ram():
    bytes_, source = device_capacity([AbstractDevice("tpu", "TPU v5 lite")])
    assert bytes_ == 16 * GIB and source.startswith("TPU v5 lite HBM (cloud.google.com/tpu/docs/v5e")
    assert device_capacity(jax.devices())[1] == "host RAM / local devices"
    with pytest.raises(ConfigError, match="no HBM figure for TPU v9"):
        device_capacity([AbstractDevice("tpu", "TPU v9")])
