"""Logit parity with transformers (fp32, eager attention) for every supported family, and layer by layer.

Each family's tiny random model is saved as an HF folder and loaded through ftjax's loader. One ftjax
call per family computes a 5-row batch: two plain rows, a right-padded row, a left-padded row with
explicit positions and a row packing two segments; each test checks its rows against transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ftjax.interop.hf import load_hf
from ftjax.models import layers as L
from ftjax.models.attention import Rows
from hf_helpers import FAMILIES, LAYER_TOL, MODEL_TOL, TINY, hf_logits, jax_logits, max_diff, random_ids, save, \
    tiny_hf

T = 12  # sequence length; longer than every sliding window (4) in FAMILIES
PAD_RIGHT, PAD_LEFT, CUT = 4, 4, 5  # row 2: 4 pads at the end; row 3: 4 at the start; row 4: segments 5 + 7


def _batch():
    """ids/segment_ids/positions for the 5 rows, and the matching HF attention_mask/position_ids for rows 0-3."""
    ids = random_ids(5, T, seed=1)
    seg = np.ones((5, T), np.int64)
    pos = np.tile(np.arange(T), (5, 1))
    seg[2, T - PAD_RIGHT:] = 0
    ids[2, T - PAD_RIGHT:] = 0
    seg[3, :PAD_LEFT] = 0
    ids[3, :PAD_LEFT] = 0
    pos[3] = np.maximum(np.arange(T) - PAD_LEFT, 0)
    pos[2, T - PAD_RIGHT:] = 0
    seg[4, CUT:] = 2
    pos[4, CUT:] -= CUT
    return ids, seg, pos


def hf_references(hf, ids, seg, pos) -> tuple:
    """transformers' logits of `_batch()`: rows 0-3 with mask and positions, row 4's two segments alone."""
    ref = hf_logits(hf, ids[:4], attention_mask=(seg[:4] > 0).astype(np.int64), position_ids=pos[:4])
    return ref, [hf_logits(hf, ids[4:, :CUT]), hf_logits(hf, ids[4:, CUT:])]


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory):
    """Per family: the ftjax logits of the 5-row batch and the transformers references."""
    model_type, overrides = FAMILIES[request.param]
    hf = tiny_hf(model_type, **overrides)
    model = load_hf(save(hf, tmp_path_factory.mktemp(request.param)))
    ids, seg, pos = _batch()
    ours = jax_logits(model, ids, pos, seg)
    ref, ref_segments = hf_references(hf, ids, seg, pos)
    return dict(name=request.param, ours=ours, ref=ref, ref_segments=ref_segments, hf=hf, model=model)


def test_batch_parity(run):
    assert max_diff(run["ours"][:2], run["ref"][:2]) <= MODEL_TOL
    assert np.abs(run["ref"][:2]).max() > 0.5  # the logits are not trivially small


def test_right_padding_parity(run):
    real = T - PAD_RIGHT
    assert max_diff(run["ours"][2, :real], run["ref"][2, :real]) <= MODEL_TOL


def test_left_padding_parity(run):
    assert max_diff(run["ours"][3, PAD_LEFT:], run["ref"][3, PAD_LEFT:]) <= MODEL_TOL


def test_packed_segments_match_separate_runs(run):
    first, second = run["ref_segments"]
    assert max_diff(run["ours"][4, :CUT], first[0]) <= MODEL_TOL
    assert max_diff(run["ours"][4, CUT:], second[0]) <= MODEL_TOL


def test_config_mapping(run):
    """The loaded config carries the family's features (so parity above exercised them)."""
    cfg, name = run["model"].config, run["name"]
    expect = {
        "llama_mqa_tied": lambda: cfg.num_kv_heads == 1 and cfg.tie_word_embeddings and run["model"].lm_head is None,
        "llama_bias": lambda: cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias,
        "llama3_rope": lambda: cfg.rope.kind == "llama3" and cfg.rope.factor == 4.0,
        "linear_rope": lambda: cfg.rope.kind == "linear" and cfg.rope.factor == 2.0,
        "mistral_window": lambda: cfg.sliding_window == 4 and cfg.sliding_layers == (),
        "qwen2": lambda: cfg.qkv_bias and not cfg.o_bias,
        "qwen3": lambda: cfg.qk_norm and cfg.head_dim == 24,
        "qwen2_layer_windows": lambda: cfg.sliding_layers == (False, True, True),
        "qwen3_layer_windows": lambda: cfg.sliding_layers == (False, False, True),
        "gemma2": lambda: (cfg.gemma.sandwich_norms and cfg.gemma.norm_offset and cfg.gemma.embed_scale
                           and cfg.gemma.attn_softcap == 3.0 and cfg.gemma.final_softcap == 2.0
                           and cfg.gemma.query_scale == 24 ** -0.5
                           and cfg.sliding_layers == (True, False, True) and cfg.gemma.hidden_act == "gelu_tanh"),
        "gemma3": lambda: (cfg.qk_norm and cfg.gemma.norm_offset and cfg.gemma.local_rope.theta == 100.0
                           and cfg.rope.kind == "linear" and cfg.gemma.attn_softcap is None
                           and cfg.sliding_layers == (True, False, True)),
        "phi3_window": lambda: cfg.phi is not None and cfg.sliding_window == 4 and cfg.phi.rotary_dim is None,
        "phi4_mini_partial_rotary": lambda: (cfg.phi is not None and cfg.phi.rotary_dim == 12
                                             and cfg.tie_word_embeddings),
        "phi4_mini_longrope": lambda: (cfg.rope.kind == "longrope" and cfg.rope.factor == 4.0
                                       and cfg.rope.attention_factor > 1.1 and cfg.phi.rotary_dim == 12),
    }.get(name, lambda: cfg.num_kv_heads == 2 and not cfg.tie_word_embeddings)
    assert expect()


# ----------------------------------------------------------------------------- layer level


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def test_rmsnorm_parity():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(0)
    x = (3.0 * rng.standard_normal((2, 5, 64))).astype(np.float32)
    w = (1.0 + 0.3 * rng.standard_normal(64)).astype(np.float32)
    ref = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(_t(w))
        expected = ref(_t(x)).numpy()
    norm = L.RMSNorm(64, eps=1e-5)
    norm.scale[...] = jnp.asarray(w)
    assert max_diff(norm(jnp.asarray(x)), expected) <= LAYER_TOL


@pytest.mark.parametrize("family", ["llama_gqa_untied", "linear_rope", "llama3_rope"])
def test_rotary_parity(family):
    """inv_freq vs transformers' rope init functions, then sin/cos and the rotation itself."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from ftjax.models.registry import config_from_hf

    model_type, overrides = FAMILIES[family]
    hf_cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    cfg = config_from_hf(hf_cfg.to_dict())
    kind = hf_cfg.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    inv_ref, scaling = init(hf_cfg)
    assert scaling == 1.0
    inv = L.rope_inv_freq(cfg.head_dim, cfg.rope)
    assert max_diff(inv, inv_ref.numpy()) <= LAYER_TOL * float(inv_ref.abs().max())

    positions = np.stack([np.arange(40), np.arange(40)[::-1] + 7])  # up to 46, past the llama3 original length
    x = np.random.default_rng(1).standard_normal((2, 40, 4, cfg.head_dim)).astype(np.float32)
    cos_ref, sin_ref = LlamaRotaryEmbedding(hf_cfg)(_t(x), _t(positions))
    sin, cos = L.rope_sin_cos(jnp.asarray(positions), inv)
    assert max_diff(sin, sin_ref.numpy()) <= LAYER_TOL and max_diff(cos, cos_ref.numpy()) <= LAYER_TOL
    q_ref, _ = apply_rotary_pos_emb(_t(x).transpose(1, 2), _t(x).transpose(1, 2), cos_ref, sin_ref)
    assert max_diff(L.apply_rope(jnp.asarray(x), sin, cos), q_ref.transpose(1, 2).numpy()) <= LAYER_TOL


def test_mlp_parity():
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    hf_cfg = AutoConfig.for_model("llama", **{**TINY, "mlp_bias": True})
    torch.manual_seed(0)
    ref = LlamaMLP(hf_cfg)
    mlp = L.MLP(64, 128, use_bias=True, rngs=nnx.Rngs(0))
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(ref, name)
            lin.weight.normal_(0.0, 0.1)
            lin.bias.normal_(0.0, 0.1)
            getattr(mlp, name).kernel[...] = jnp.asarray(lin.weight.numpy().T)
            getattr(mlp, name).bias[...] = jnp.asarray(lin.bias.numpy())
        x = np.random.default_rng(0).standard_normal((2, 6, 64)).astype(np.float32)
        expected = ref(_t(x)).numpy()
    assert max_diff(mlp(jnp.asarray(x)), expected) <= LAYER_TOL


@pytest.mark.parametrize("family", ["llama_bias", "qwen2", "qwen3"])
def test_decoder_layer_parity(family, tmp_path):
    """Layer 0 of the loaded model vs transformers' decoder layer on the same input, positions and mask."""
    model_type, overrides = FAMILIES[family]
    hf = tiny_hf(model_type, **overrides)
    model = load_hf(save(hf, tmp_path))
    graphdef, state = nnx.split(model.layers)
    layer0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

    b, t, d = 2, 7, TINY["hidden_size"]
    x = np.random.default_rng(2).standard_normal((b, t, d)).astype(np.float32)
    positions = np.tile(np.arange(t), (b, 1))
    positions[1] += 3
    causal = np.tril(np.ones((t, t), bool))
    additive = np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None].repeat(b, 0)
    with torch.no_grad():
        cos_ref, sin_ref = hf.model.rotary_emb(_t(x), _t(positions))
        out = hf.model.layers[0](_t(x), attention_mask=_t(additive), position_ids=_t(positions),
                                 position_embeddings=(cos_ref, sin_ref))
    expected = (out[0] if isinstance(out, tuple) else out).numpy()

    sin, cos = L.rope_sin_cos(jnp.asarray(positions), L.rope_inv_freq(model.config.head_dim, model.config.rope))
    seg = jnp.ones((b, t), jnp.int32)
    got, _, _ = layer0(jnp.asarray(x), sin, cos, Rows(seg, seg))
    assert max_diff(got, expected) <= LAYER_TOL
