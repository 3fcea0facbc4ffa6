"""The fast decode path against references: the token loop's unrolled layers on per-layer weights give the layer
scan's tokens and logits (plain, LoRA, QLoRA, Gemma's windows, a mixture of experts, greedy and sampled); the
sampler's two-level inverse CDF draws softmax's frequencies and never a filtered token; `first_argmax` is argmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.generate import draw, first_argmax, generate_tokens
from ftjax.interop.hf import load_hf
from ftjax.interop.quantized_base import FrozenQuant, quantize_in_place
from ftjax.lora import apply_lora
from ftjax.models.llama import Llama, ModelConfig
from ftjax.models.moe import MoEConfig
from hf_helpers import FAMILIES, MODEL_TOL, randomize_lora_b, save, tiny_hf

PROMPTS = [[5, 9, 13, 2], [7, 2], [11, 4, 8, 3, 6, 1, 9], [5, 9, 13, 2]]
NEW = 10
# contraction sizes (hidden 64, heads 64, mlp 128) hold whole 64-value NF4 blocks
CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)


def _lora(model):
    apply_lora(model, 4, 8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               rngs=nnx.Rngs(1))
    randomize_lora_b(model, seed=2)
    return model


def _model(kind: str, tmp_path):
    if kind == "llama":
        return Llama(CFG, rngs=nnx.Rngs(0))
    if kind == "lora":
        return _lora(Llama(CFG, rngs=nnx.Rngs(0)))
    if kind == "qlora_nf4":
        return quantize_in_place(_lora(Llama(CFG, rngs=nnx.Rngs(0))), FrozenQuant("nf4", None), None, None)
    if kind == "moe":
        return Llama(CFG.replace(moe=MoEConfig(4, 2, 32)), rngs=nnx.Rngs(0))
    model_type, overrides = FAMILIES[kind]
    return load_hf(save(tiny_hf(model_type, seed=3, **overrides), tmp_path))


@pytest.mark.parametrize("kind", ["llama", "lora", *(pytest.param(k, marks=pytest.mark.slow)  # ~10-30 s each here
                                                     for k in ("qlora_nf4", "moe", "gemma3"))])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_unrolled_decode_equals_the_layer_scan(kind, temperature, tmp_path):
    """Same tokens, and logits to a whole model's fp32 tolerance, whichever way the token loop runs the layers."""
    model = _model(kind, tmp_path)
    kw = dict(max_new_tokens=NEW, pad_id=0, temperature=temperature, seed=4, return_logits=True)
    scan_tokens, scan_logits = generate_tokens(model, PROMPTS, unrolled=False, **kw)
    tokens, logits = generate_tokens(model, PROMPTS, unrolled=True, **kw)
    np.testing.assert_array_equal(tokens, scan_tokens)
    np.testing.assert_allclose(logits, scan_logits, atol=MODEL_TOL, rtol=MODEL_TOL)


def test_first_argmax_is_argmax():
    """The first of equal maxima, as jnp.argmax, on rows with ties, -inf and the dtype's minimum."""
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, (64, 300)).astype(np.float32)  # many ties
    logits[1] = np.finfo(np.float32).min
    logits[2, :10] = np.inf
    logits[3] = -np.inf
    np.testing.assert_array_equal(first_argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_draw_follows_softmax_and_never_draws_a_filtered_token():
    """200k rows of one key against softmax in closed form over 700 tokens (three blocks of 256, the last padded);
    tokens at the dtype's minimum (what top-k / top-p filtering leaves) get no draw at all."""
    rng = np.random.default_rng(1)
    v, n = 700, 200_000
    logits = rng.normal(0.0, 1.5, v).astype(np.float32)
    filtered = rng.random(v) < 0.3
    filtered[256:300] = True  # a run across a block boundary
    logits[filtered] = np.finfo(np.float32).min
    draws = np.asarray(jax.jit(draw)(jax.random.key(7), jnp.broadcast_to(jnp.asarray(logits), (n, v))))
    freq = np.bincount(draws, minlength=v) / n
    p = np.where(filtered, 0.0, np.exp(logits.astype(np.float64) - logits[~filtered].max()))
    p /= p.sum()
    assert freq[filtered].sum() == 0
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
    # one token left (top-p near 0): always that token
    only = np.full((4, v), np.finfo(np.float32).min, np.float32)
    only[:, 699] = 0.0
    np.testing.assert_array_equal(draw(jax.random.key(0), jnp.asarray(only)), [699] * 4)
