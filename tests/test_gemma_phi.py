"""Gemma 2 / 3 and Phi-3 / 4 beyond the shared parity tables (tests/hf_helpers.py FAMILIES): the multimodal
Gemma 3 folder's language model, the families refused by name, and a LoRA run with the default targets."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.errors import LoadError
from ftjax.interop.hf import load_hf
from ftjax.lora import apply_lora, linears
from ftjax.models.registry import config_from_hf
from ftjax.sharding import make_mesh
from ftjax.train.optimizer import make_optimizer
from ftjax.train.state import init_state
from ftjax.train.step import make_train_step
from hf_helpers import FAMILIES, LAYER_TOL, MODEL_TOL, TINY, hf_logits, jax_logits, max_diff, random_ids, save, tiny_hf
from test_train_step import optim
from train_helpers import make_batch


def test_multimodal_gemma3_folder_loads_its_language_model(tmp_path, caplog):
    """Gemma3ForConditionalGeneration's text logits (text-only ids) from the folder's language-model tensors;
    exported, the language model alone is a Gemma3ForCausalLM folder."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    _, text = FAMILIES["gemma3"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config={**TINY, **text}, vision_config=vision, mm_tokens_per_image=4,
                       image_token_index=127)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((0.2 if name.endswith("norm.weight") else 0.08) * torch.randn_like(p))
    with caplog.at_level(logging.WARNING):
        model = load_hf(save(hf, tmp_path))
    assert any("vision tower ignored" in r.getMessage() for r in caplog.records)
    assert model.config.model_type == "gemma3_text" and model.config.gemma.local_rope.theta == 100.0
    ids = random_ids(2, 12, vocab=126)
    assert max_diff(jax_logits(model, ids), hf_logits(hf, ids)) <= MODEL_TOL
    from transformers import AutoModelForCausalLM

    from ftjax.interop.export_hf import export_hf

    out = export_hf(model, tmp_path / "export", source=tmp_path)  # the text model, as Gemma3ForCausalLM
    text = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(text).__name__ == "Gemma3ForCausalLM"
    assert max_diff(hf_logits(text, ids), hf_logits(hf, ids)) <= MODEL_TOL


def test_longrope_switches_to_long_factors_past_the_original_length(tmp_path):
    """A call whose positions reach past original_max_position_embeddings (8) uses the long factors, a shorter
    call the short ones: both as transformers."""
    model_type, overrides = FAMILIES["phi4_mini_longrope"]
    hf = tiny_hf(model_type, **{**overrides, "original_max_position_embeddings": 8})
    model = load_hf(save(hf, tmp_path))
    for length in (6, 12):
        ids = random_ids(2, length, seed=length)
        assert max_diff(jax_logits(model, ids), hf_logits(hf, ids)) <= MODEL_TOL


@pytest.mark.parametrize("family", ["gemma3", "phi3_window"])
def test_sharded_fsdp_by_tensor_matches_transformers(family, tmp_path):
    """Loaded onto 8 simulated devices (fsdp 4 x tensor 2: Phi's fused qkv / gate_up outputs split too),
    the jitted forward under activation sharding keeps transformers' logits."""
    import jax.numpy as jnp

    from ftjax.sharding import activation_sharding

    model_type, overrides = FAMILIES[family]
    hf = tiny_hf(model_type, **overrides)
    mesh = make_mesh(1, 4, 2)
    model = load_hf(save(hf, tmp_path), mesh=mesh)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        with activation_sharding(mesh):
            return nnx.merge(graphdef, state)(ids)

    ids = random_ids(2, 12, seed=4)
    assert len(model.embed_tokens[...].addressable_shards) == 8
    assert max_diff(forward(state, jnp.asarray(ids, jnp.int32)), hf_logits(hf, ids)) <= MODEL_TOL


@pytest.mark.parametrize("model_type,name", [("phi3small", "Phi-3-small"), ("phimoe", "Phi-3.5-MoE")])
def test_phi_variants_refused_by_name(model_type, name):
    with pytest.raises(LoadError, match=f"{name} .* is not supported"):
        config_from_hf({"model_type": model_type})


def test_gemma3_default_pattern_is_five_local_to_one_global():
    cfg = config_from_hf({**TINY, "model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 8})
    assert cfg.sliding_layers == ((True,) * 5 + (False,)) * 2 and cfg.gemma.local_rope.theta == 10_000.0
    assert cfg.rope.theta == 1_000_000.0 and cfg.tie_word_embeddings


def test_gemma2_keys_left_out_take_transformers_defaults():
    cfg = config_from_hf({**TINY, "model_type": "gemma2", "head_dim": 16})
    g = cfg.gemma
    assert (g.attn_softcap, g.final_softcap, g.query_scale, cfg.sliding_window) == (50.0, 30.0, 1 / 16, 4096)
    assert cfg.sliding_layers == (True, False) and cfg.tie_word_embeddings
    assert config_from_hf({**TINY, "model_type": "gemma2", "final_logit_softcapping": None}).gemma.final_softcap is None


def test_hub_multimodal_gemma3_config_fills_text_defaults():
    """gemma-3-4b-it's config.json names only what differs from Gemma3TextConfig's defaults in text_config."""
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    cfg = config_from_hf(hub)
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (262_208, 8, 4, 256, 34)
    assert cfg.gemma.query_scale == 256 ** -0.5 and cfg.sliding_window == 1024 and cfg.tie_word_embeddings
    assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.theta, cfg.gemma.local_rope.theta) == ("linear", 8.0, 1e6, 1e4)
    assert [i for i, f in enumerate(cfg.sliding_layers) if not f] == [5, 11, 17, 23, 29]


def test_default_targets_adapt_phis_fused_projections(tmp_path):
    """Phi-3 stores qkv_proj / gate_up_proj fused: the default targets put one adapter on each fused output."""
    model = load_hf(save(tiny_hf("phi3", **FAMILIES["phi3_window"][1]), tmp_path))
    apply_lora(model, 2, 4.0, rngs=nnx.Rngs(0))
    adapted = {path.split(".")[-1]: lin for path, lin in linears(model) if lin.lora is not None}
    assert sorted(adapted) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert adapted["qkv_proj"].lora.lora_b[...].shape[-1] == (4 + 2 * 2) * 16  # q, k and v heads at once


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3_window"])
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_lora_training_loss_falls(family, tmp_path):
    """The production step, default LoRA targets, 30 steps on one packed batch: the loss falls well below
    its start (Gemma 2's final soft-cap of 2 bounds how far)."""
    model_type, overrides = FAMILIES[family]
    folder = save(tiny_hf(model_type, **overrides), tmp_path)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = make_optimizer(optim("adamw", lr=3e-2), 30)
    state = init_state(lambda: apply_lora(load_hf(folder), 4, 8.0, rngs=nnx.Rngs(1)), opt.tx, mesh,
                       trainable=nnx.LoRAParam)
    step = make_train_step(state, opt, mesh, loss_chunk=8)
    batch = make_batch(4, 16, vocab=TINY["vocab_size"])
    t, o, losses = state.trainable, state.opt_state, []
    for i in range(30):
        t, o, m = step(t, o, state.frozen, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and step.traces == 1
    assert losses[-1] < 0.6 * losses[0], losses


# ----------------------------------------------------------------------------- layer level


def test_gemma_rmsnorm_parity():
    """(1 + w) scaling in fp32 before the cast, as Gemma3RMSNorm (the stored weight is w, zero-initialized)."""
    import jax.numpy as jnp
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from ftjax.models.layers import RMSNorm

    rng = np.random.default_rng(0)
    x = (3.0 * rng.standard_normal((2, 5, 64))).astype(np.float32)
    w = (0.3 * rng.standard_normal(64)).astype(np.float32)
    ref = Gemma3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.as_tensor(w))
        expected = ref(torch.as_tensor(x)).numpy()
    norm = RMSNorm(64, eps=1e-6, offset=True)
    assert float(jnp.abs(norm.scale[...]).max()) == 0.0
    norm.scale[...] = jnp.asarray(w)
    assert max_diff(norm(jnp.asarray(x)), expected) <= LAYER_TOL


@pytest.mark.parametrize("model_type", ["gemma2", "phi3"])
def test_mlp_parity(model_type):
    """Gemma's GeGLU (gelu_pytorch_tanh) and Phi-3's fused gate_up_proj (gate first) vs transformers' MLPs."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoConfig
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    from ftjax.models.layers import MLP

    hf_cfg = AutoConfig.for_model(model_type, **TINY)
    torch.manual_seed(0)
    ref = (Gemma2MLP if model_type == "gemma2" else Phi3MLP)(hf_cfg)
    mlp = MLP(64, 128, activation="gelu_tanh" if model_type == "gemma2" else "silu", packed=model_type == "phi3",
              rngs=nnx.Rngs(0))
    names = ("gate_proj", "up_proj", "down_proj") if model_type == "gemma2" else ("gate_up_proj", "down_proj")
    with torch.no_grad():
        for name in names:
            lin = getattr(ref, name)
            lin.weight.normal_(0.0, 0.1)
            getattr(mlp, name).kernel[...] = jnp.asarray(lin.weight.numpy().T)
        x = np.random.default_rng(0).standard_normal((2, 6, 64)).astype(np.float32)
        expected = ref(torch.as_tensor(x)).numpy()
    assert max_diff(mlp(jnp.asarray(x)), expected) <= LAYER_TOL
