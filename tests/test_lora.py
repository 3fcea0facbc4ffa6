"""LoRA injection, merge/unmerge, gradients, and parity with PEFT on an equivalent HF model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from ftjax.errors import ConfigError
from ftjax.lora import LoRA, apply_lora, linears, merge_lora, merged, unmerge_lora
from ftjax.methods import Full, Lora
from ftjax.models.layers import Linear
from train_helpers import TINY, make_batch, tiny_model

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


def randomize_b(model, seed=0):
    """Give every adapter a non-zero B so it changes the output."""
    key = jax.random.key(seed)
    for _, linear in linears(model):
        if linear.lora is not None:
            key, sub = jax.random.split(key)
            b = linear.lora.lora_b
            b[...] = 0.1 * jax.random.normal(sub, b[...].shape, b[...].dtype)
    return model


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(make_batch(2, 12, packed=False)["input_ids"])


def test_zero_b_reproduces_base_logits_exactly(ids):
    model = tiny_model()
    base = model(ids)
    apply_lora(model, 4, 8.0, rngs=nnx.Rngs(1))
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 14  # 7 targets x (A, B)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base))
    # dropout acts on the adapter's input only: with B = 0 the output is still the base output
    drop = apply_lora(tiny_model(), 4, 8.0, dropout=0.5, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(drop(ids, rng=jax.random.key(3))), np.asarray(base))
    # with a non-zero B, dropout changes the output only when an rng is passed (training)
    randomize_b(drop)
    eval_out, train_out = drop(ids), drop(ids, rng=jax.random.key(3))
    assert np.abs(np.asarray(train_out - eval_out)).max() > 1e-3


def test_adapter_params_are_stacked_lora_params_with_axes():
    model = apply_lora(tiny_model(), 4, 8.0, targets="q_proj,down_proj", rngs=nnx.Rngs(1))
    q = model.layers.self_attn.q_proj.lora
    down = model.layers.mlp.down_proj.lora
    assert isinstance(q.lora_a, nnx.LoRAParam) and isinstance(q.lora_b, nnx.LoRAParam)
    assert q.lora_a[...].shape == (TINY.num_layers, TINY.hidden_size, 4)
    assert q.lora_b[...].shape == (TINY.num_layers, 4, TINY.num_heads * TINY.head_dim)
    assert q.lora_a.get_metadata()["logical_axes"] == ("layers", "embed", "lora_rank")
    assert down.lora_b.get_metadata()["logical_axes"] == ("layers", "lora_rank", "embed")
    assert not np.any(np.asarray(q.lora_b[...]))
    bound = 1.0 / np.sqrt(TINY.hidden_size)  # PEFT's kaiming-uniform bound for A
    assert np.abs(np.asarray(q.lora_a[...])).max() <= bound
    assert model.layers.self_attn.k_proj.lora is None


def test_target_patterns():
    model = apply_lora(tiny_model(), 2, 4.0, targets=["layers.mlp.*"], rngs=nnx.Rngs(1))
    with_lora = sorted(p for p, lin in linears(model) if lin.lora is not None)
    assert with_lora == ["layers.mlp.down_proj", "layers.mlp.gate_proj", "layers.mlp.up_proj"]
    with pytest.raises(ConfigError, match="q_prj"):
        apply_lora(tiny_model(), 2, 4.0, targets="q_prj", rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="lm_head"):
        apply_lora(tiny_model(), 2, 4.0, targets="lm_head", rngs=nnx.Rngs(1))
    assert Lora.trainable is nnx.LoRAParam and Full.trainable is nnx.Param


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores(ids, rslora):
    model = randomize_b(apply_lora(tiny_model(), 4, 8.0, rslora=rslora, rngs=nnx.Rngs(1)))
    kernels = [np.asarray(lin.kernel[...]) for _, lin in linears(model)]
    with_adapters = model(ids)
    copy = merged(model)
    assert not jax.tree.leaves(nnx.state(copy, nnx.LoRAParam))
    np.testing.assert_allclose(copy(ids), with_adapters, atol=LAYER_TOL, rtol=LAYER_TOL)
    np.testing.assert_array_equal(model(ids), with_adapters)  # the copy left the original alone
    adapters = merge_lora(model)
    np.testing.assert_allclose(model(ids), with_adapters, atol=LAYER_TOL, rtol=LAYER_TOL)
    unmerge_lora(model, adapters)
    for k, (_, lin) in zip(kernels, linears(model)):
        np.testing.assert_allclose(lin.kernel[...], k, atol=LAYER_TOL, rtol=0)
    np.testing.assert_allclose(model(ids), with_adapters, atol=LAYER_TOL, rtol=LAYER_TOL)


def test_lora_linear_gradients():
    linear = Linear(6, 5, axes=("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    linear.lora = nnx.data(LoRA(6, 5, rank=3, alpha=6.0, in_axis="embed", out_axis="mlp", rngs=nnx.Rngs(1)))
    linear.lora.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(2), (3, 5))
    graphdef, adapter, rest = nnx.split(linear, nnx.LoRAParam, ...)
    x = jax.random.normal(jax.random.key(3), (4, 6))

    def f(x, adapter):
        return nnx.merge(graphdef, adapter, rest)(x)

    # y = xW + b + s·xAB: check against the closed form, then AD against finite differences
    a, b = linear.lora.lora_a[...], linear.lora.lora_b[...]
    want = x @ linear.kernel[...] + linear.bias[...] + 2.0 * (x @ a @ b)
    np.testing.assert_allclose(f(x, adapter), want, atol=LAYER_TOL, rtol=LAYER_TOL)
    check_grads(f, (x, adapter), order=2, modes=("fwd", "rev"))


def hf_llama_from(model):
    """transformers' LlamaForCausalLM with the same config and weights as an ftjax Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftjax.models.registry import hf_tensor_name, is_stacked

    c = model.config
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd = hf.state_dict()
    _, _, params = nnx.split(model, nnx.LoRAParam, nnx.Param)
    copied = 0
    for path, var in nnx.to_flat_state(params):
        path = tuple(str(p) for p in path)
        arr = np.asarray(var[...])
        for i, a in enumerate(arr) if is_stacked(path) else [(None, arr)]:
            name, transpose = hf_tensor_name(path, i)
            sd[name].copy_(torch.from_numpy(np.array(a.T if transpose else a, copy=True)))
            copied += 1
    assert copied == len(sd)
    return hf


@pytest.mark.parametrize("rslora,targets", [(False, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
                                            (True, "q_proj,v_proj,down_proj")])
def test_lora_matches_peft(ids, rslora, targets):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = randomize_b(apply_lora(tiny_model(), 4, 8.0, targets=targets, rslora=rslora, rngs=nnx.Rngs(1)))
    hf = hf_llama_from(model)
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets.split(","), lora_dropout=0.0,
                          use_rslora=rslora, init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()
    ours = {f"layers.{i}.{p.split('.', 1)[1]}": (lin.lora, i) for p, lin in linears(model) if lin.lora is not None
            for i in range(TINY.num_layers)}
    set_count = 0
    for name, module in pm.named_modules():
        key = name[name.find("layers."):]
        if "layers." in name and key in ours and hasattr(module, "lora_A"):
            lora, i = ours[key]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(lora.lora_a[...][i]).T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(lora.lora_b[...][i]).T.copy()))
            set_count += 1
    assert set_count == len(ours)
    with torch.no_grad():
        want = pm(torch.from_numpy(np.asarray(ids)).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), want, atol=MODEL_TOL, rtol=MODEL_TOL)
