"""`auto` config values per backend, and a bf16 train step against the fp32 one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax.backend_defaults import DEFAULTS, KEYS, resolve_auto
from ftjax.benchmark import prepare
from ftjax.errors import ConfigError

BF16_STEP_RTOL = 1e-2  # bf16 compute + bf16 frozen weights vs fp32, relative loss difference


def values(c) -> dict:
    return {key: config_lib.get(c, key) for key in KEYS}


def test_cpu_auto_is_the_cpu_tuned_setting():
    """On CPU `auto` gives exactly the values the CPU suite and benchmarks were tuned with."""
    c = config_lib.validate(config_lib.default_config())
    assert jax.default_backend() == "cpu"
    assert values(c) == {"model.attention": "xla", "model.dtype": "float32", "train.frozen_dtype": "float32",
                         "model.remat": "minimal"}


@pytest.mark.parametrize("backend,want", [
    ("gpu", ("cudnn", "bfloat16", "bfloat16", "none")),
    ("tpu", ("splash", "bfloat16", "bfloat16", "minimal")),
    ("cpu", ("xla", "float32", "float32", "minimal")),
])
def test_auto_per_backend_and_explicit_values_win(backend, want):
    c = resolve_auto(config_lib.default_config(), backend)
    assert tuple(values(c).values()) == want == tuple(DEFAULTS[backend][k] for k in KEYS)
    explicit = config_lib.default_config()
    explicit.model.attention, explicit.model.dtype, explicit.model.remat = "pallas_gpu", "float16", "full"
    explicit.train.frozen_dtype = "float32"
    assert values(resolve_auto(explicit, backend)) == {"model.attention": "pallas_gpu", "model.dtype": "float16",
                                                       "train.frozen_dtype": "float32", "model.remat": "full"}


def test_bad_attention_names_the_choices():
    c = config_lib.default_config()
    c.model.attention = "flash"
    with pytest.raises(ConfigError, match="config.model.attention='flash' is not one of auto, xla, cudnn"):
        config_lib.validate(c)


def step_losses(dtype: str, frozen: str, method: str) -> list[float]:
    c = config_lib.default_config()
    c.model.path, c.method = "tiny-random-llama", method
    c.model.dtype, c.train.frozen_dtype = dtype, frozen
    c.data.seq_len, c.train.batch_size, c.mesh.data = 64, 2, 1
    bench = prepare(config_lib.validate(c), jax.devices()[:1])
    losses = []
    for _ in range(2):  # the first step's loss is the forward pass; the second follows one bf16 update
        bench.run(1)
        losses.append(bench.last_loss)
    return losses


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_bf16_step_matches_fp32(method):
    want = step_losses("float32", "float32", method)
    got = step_losses("bfloat16", "bfloat16", method)
    np.testing.assert_allclose(got, want, rtol=BF16_STEP_RTOL)


def test_memory_estimate_counts_score_blocks_for_xla_only():
    """The kernels keep no [T, S] score blocks: remat=none activations drop exactly L·t·b·5·a·t·(bytes/2)."""
    from ftjax import api
    from ftjax.sharding import make_mesh
    from ftjax.train.compose import compose
    from ftjax.train.memory import estimate

    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    acts = {}
    for attention in ("xla", "splash"):
        c = config_lib.default_config()
        c.model.path, c.model.remat, c.model.attention = "tiny-random-llama", "none", attention
        c.data.seq_len, c.train.batch_size, c.mesh.data = 256, 2, 1
        cfg = api.model_config(c.model.path)
        acts[attention] = estimate(compose(c, jax.devices()[:1]), cfg, mesh)["activations"]
    t, b = 256, 2
    want = cfg.num_layers * t * b * 5 * cfg.num_heads * t * (4 / 2)  # fp32: 4 bytes, the formula's unit is 2
    assert acts["xla"] - acts["splash"] == pytest.approx(want, rel=1e-6)
