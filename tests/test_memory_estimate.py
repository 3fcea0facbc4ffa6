"""The per-device memory estimate against hand counts, and the stop when a run cannot fit."""

import pytest

from ftjax.interop.sources import tiny_config
from ftjax.errors import ConfigError
from ftjax.sharding import make_mesh
from ftjax.train.memory import check_fits, estimate
from loop_helpers import load_config


def _params(cfg):
    d, h, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    per_layer = 2 * d + d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    return layers * per_layer + cfg.vocab_size * d + d  # tied embedding + final norm


def test_full_params_and_adam_state_split_over_fsdp():
    c = load_config()
    c.method = "full"
    cfg = tiny_config()
    one = estimate(c, cfg, make_mesh(data=1, fsdp=1, tensor=1, devices=__import__("jax").devices()[:1]))
    assert one["trainable"] == 4 * _params(cfg)
    assert one["frozen"] == 0
    assert 2 * one["trainable"] <= one["opt_state"] <= 2 * one["trainable"] + 64  # Adam mu, nu (+ counters)
    eight = estimate(c, cfg, make_mesh(data=1, fsdp=8, tensor=1))
    assert eight["trainable"] < one["trainable"] / 4  # embed dims are split 8 ways (norm scales are not)


def test_lora_trains_only_adapters():
    c = load_config()
    cfg = tiny_config()
    parts = estimate(c, cfg, make_mesh(data=8, fsdp=1, tensor=1))
    r, d, layers = c.lora.rank, cfg.hidden_size, cfg.num_layers
    kv, i, q = cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    adapters = layers * r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d))
    assert parts["trainable"] == 4 * adapters
    assert parts["frozen"] == 4 * _params(cfg)


def test_a_run_that_cannot_fit_stops_with_one_line():
    c = load_config()
    c.train.batch_size = 8 * 4096
    c.data.seq_len = 8192
    with pytest.raises(ConfigError, match="does not fit"):
        check_fits(c, tiny_config(), make_mesh(data=8, fsdp=1, tensor=1))


def test_remat_policies_keep_what_they_save():
    """Activations per policy against the hand count: none keeps every layer's intermediates; full,
    minimal and dots keep their saved values per layer plus one layer's intermediates."""
    import jax

    c = load_config()
    cfg = tiny_config()
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    acts = {}
    for policy in ("none", "full", "minimal", "dots"):
        c.model.remat = policy
        acts[policy] = estimate(c, cfg, mesh)["activations"]
    d, t, rows = cfg.hidden_size, c.data.seq_len, c.train.batch_size // c.train.grad_accum
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    layer = t * rows * d * (34 + 5 * cfg.num_heads * t / d) * 2  # fp32: twice the 16-bit count
    logits = rows * min(c.train.loss_chunk, t) * cfg.vocab_size * 4 * 3
    minimal = 3 * d + q + 2 * kv + 2 * i + c.lora.rank * 7
    assert acts["none"] == int(cfg.num_layers * layer + logits)
    assert acts["full"] == int(cfg.num_layers * t * rows * d * 4 + layer + logits)
    assert acts["minimal"] == int(cfg.num_layers * t * rows * minimal * 4 + layer + logits)
    assert acts["full"] < acts["minimal"] < acts["dots"] < acts["none"]
