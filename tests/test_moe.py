"""Mixture of experts (Mixtral, Qwen3-MoE): the grouped paths (with and without expert LoRA) vs a dense
all-experts reference, their compiled cost, parity with transformers (layer and model, batch/padding/packing,
KV cache), both on-disk expert layouts, the balance loss and the step's balance term vs transformers' own, LoRA
training (attention and experts), expert LoRA through PEFT's target_parameters, 1 vs 8 devices (fsdp x expert,
the mesh from the config), and HF export (transformers' logits, bit-equal reload, per-expert Hub names)."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ftjax.config import default_config, validate, validate_for_model
from ftjax.errors import ConfigError, LoadError
from ftjax.interop.export_hf import export_hf
from ftjax.interop.hf import load_hf
from ftjax.models import moe as M
from ftjax.models.llama import Llama
from ftjax.sharding import make_mesh, mesh_from_config, state_shardings
from hf_helpers import LAYER_TOL, MODEL_TOL, hf_logits, jax_logits, max_diff, random_ids, save, tiny_hf
from test_generate import check_kv_cache_matches_full_forward
from test_model_parity import CUT, PAD_LEFT, PAD_RIGHT, T, _batch, hf_references

MOE_FAMILIES = {
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=False)),
}


def with_implementation(model, implementation: str):
    """The same weights with the MoE layers on another grouped-matmul path."""
    cfg = model.config
    graphdef, state = nnx.split(model)
    other = nnx.eval_shape(lambda: type(model)(cfg.replace(moe=dataclasses.replace(cfg.moe,
                                                                                 implementation=implementation)),
                                               rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.split(other)[0], state)


# ----------------------------------------------------------------------------- grouped paths vs dense


def dense_moe(x_nd, router_de, gate_edf, up_edf, down_efd, top_k, norm):
    """Every expert on every token, then masked by the routing weights (the reference)."""
    probs = jax.nn.softmax(x_nd @ router_de, axis=-1)
    top, idx = jax.lax.top_k(probs, top_k)
    top = top / top.sum(-1, keepdims=True) if norm else top
    combine = jnp.sum(jax.nn.one_hot(idx, router_de.shape[1]) * top[..., None], axis=1)  # [N, E]
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_nd, gate_edf)) * jnp.einsum("nd,edf->nef", x_nd, up_edf)
    return jnp.einsum("ned,ne->nd", jnp.einsum("nef,efd->ned", h, down_efd), combine)


def _block(e=8, k=2, d=16, f=24, implementation="tiled", seed=0):
    cfg = M.MoEConfig(e, k, f, norm_topk_prob=False, implementation=implementation)
    block = M.SparseMoE(d, cfg, rngs=nnx.Rngs(seed))
    block.router[...] = 10.0 * block.router[...]  # routing far from uniform: groups of very different sizes
    for w in (block.experts.gate_proj, block.experts.up_proj, block.experts.down_proj):
        w[...] = 15.0 * w[...]  # outputs of order 1 (the init's 0.02 std gives ~1e-4)
    return block


@pytest.mark.parametrize("implementation", ["tiled", "ragged"])
def test_grouped_equals_dense_reference(implementation):
    """Outputs and gradients (input, router, every expert weight) of the grouped path = the dense reference."""
    block = _block(implementation=implementation)
    x = jax.random.normal(jax.random.key(1), (2, 13, 16))
    graphdef, params = nnx.split(block)

    def grouped(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return y

    def dense(params, x):
        p = nnx.merge(graphdef, params)
        e = p.experts
        y = dense_moe(x.reshape(-1, 16), p.router[...], e.gate_proj[...], e.up_proj[...], e.down_proj[...], 2, False)
        return y.reshape(x.shape)

    y, ref = jax.jit(grouped)(params, x), jax.jit(dense)(params, x)
    assert max_diff(y, ref) <= LAYER_TOL and float(jnp.abs(ref).max()) > 0.01
    probe = jax.random.normal(jax.random.key(2), y.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * probe), argnums=(0, 1)))  # noqa: E731
    g, g_ref = grad(grouped)(params, x), grad(dense)(params, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert max_diff(a, b) <= LAYER_TOL * max(1.0, float(jnp.abs(b).max()))


@pytest.mark.parametrize("implementation", ["tiled", "ragged"])
def test_grouped_with_expert_lora_equals_dense_reference(implementation):
    """Per-expert adapters over gate|up and down inside the grouped path = the dense reference on W_e + s·A_e·B_e,
    in outputs and gradients (input, router, expert weights, both adapters' A and B); merging folds them in."""
    from ftjax.lora import apply_lora, merged

    block = apply_lora(_block(implementation=implementation), 3, 6.0, targets="experts", rngs=nnx.Rngs(3))
    e = block.experts
    for i, adapter in enumerate((e.gate_up_lora, e.down_lora)):
        assert adapter.lora_a[...].shape == ((8, 16, 3), (8, 24, 3))[i] and adapter.scale == 2.0
        adapter.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(10 + i), adapter.lora_b[...].shape)
    x = jax.random.normal(jax.random.key(1), (2, 13, 16))
    graphdef, params = nnx.split(block)

    def grouped(params, x):
        return nnx.merge(graphdef, params)(x)[0]

    def dense(params, x):
        p = nnx.merge(graphdef, params)
        e = p.experts
        delta = lambda m: m.scale * jnp.einsum("eir,ero->eio", m.lora_a[...], m.lora_b[...])  # noqa: E731
        gate_up = jnp.concatenate([e.gate_proj[...], e.up_proj[...]], axis=-1) + delta(e.gate_up_lora)
        down = e.down_proj[...] + delta(e.down_lora)
        y = dense_moe(x.reshape(-1, 16), p.router[...], gate_up[..., :24], gate_up[..., 24:], down, 2, False)
        return y.reshape(x.shape)

    y, ref = jax.jit(grouped)(params, x), jax.jit(dense)(params, x)
    plain = _block(implementation=implementation)(x)[0]  # the same weights without adapters
    assert max_diff(y, ref) <= LAYER_TOL and max_diff(ref, plain) > 0.1
    assert max_diff(merged(block)(x)[0], ref) <= LAYER_TOL
    probe = jax.random.normal(jax.random.key(2), y.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * probe), argnums=(0, 1)))  # noqa: E731
    g, g_ref = grad(grouped)(params, x), grad(dense)(params, x)
    assert len(jax.tree.leaves(g)) == 9  # router, 3 expert weights, 2 adapters x (A, B), the input
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert max_diff(a, b) <= LAYER_TOL * max(1.0, float(jnp.abs(b).max()))


def test_expert_targets_default_and_refusals():
    """The default targets on a MoE model mean attention + the experts' gate|up and down (as on a dense model every
    projection); a bare 'down_proj' is no expert target; expert adapters refuse dropout (as PEFT) in one line."""
    from ftjax.lora import apply_lora
    from train_helpers import TINY

    build = lambda: Llama(TINY.replace(moe=M.MoEConfig(4, 2, 16)), rngs=nnx.Rngs(0))  # noqa: E731
    model = apply_lora(build(), 2, 4.0, rngs=nnx.Rngs(0))
    adapted = {".".join(p[-3:-1]) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert adapted == {"q_proj.lora", "k_proj.lora", "v_proj.lora", "o_proj.lora", "experts.gate_up_lora",
                       "experts.down_lora"}
    assert model.layers.mlp.experts.gate_up_lora.lora_b[...].shape == (2, 4, 2, 32)
    with pytest.raises(ConfigError, match=r"pattern\(s\) down_proj match no linear layer or the experts"):
        apply_lora(build(), 2, 4.0, targets="q_proj,down_proj", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"expert adapters take no lora.dropout .*; set lora.dropout=0$"):
        apply_lora(build(), 2, 4.0, targets="experts", dropout=0.1, rngs=nnx.Rngs(0))


def test_tiled_matmul_with_empty_and_straddling_groups():
    """Groups of 0 rows, and tiles of 4 that hold the rows of up to three experts, vs a per-group loop."""
    sizes = np.array([5, 0, 13, 2, 0, 1, 7, 0], np.int32)
    m, d, f = int(sizes.sum()), 6, 10
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (m, d))
    gate, up = jax.random.normal(ks[1], (8, d, f)), jax.random.normal(ks[2], (8, d, f))
    down = jax.random.normal(ks[3], (8, f, d))
    got = jax.jit(M.tiled_expert_mlp, static_argnames="tile")(x, gate, up, down, jnp.asarray(sizes), tile=4)
    start, parts = 0, []
    for e, n in enumerate(sizes):
        xe = x[start:start + n]
        parts.append((jax.nn.silu(xe @ gate[e]) * (xe @ up[e])) @ down[e])
        start += n
    assert max_diff(got, jnp.concatenate(parts)) <= LAYER_TOL * float(jnp.abs(jnp.concatenate(parts)).max())


def _flops(e, k, implementation, tokens=256, d=64, f=128):
    block = _block(e, k, d, f, implementation)
    graphdef, params = nnx.split(block)
    x = jax.ShapeDtypeStruct((1, tokens, d), jnp.float32)
    cost = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0]).lower(params, x).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_tiled_cost_grows_with_top_k_not_experts():
    """Compiled FLOPs of the tiled path: x4 top-k -> ~x4; x4 experts -> about the same (within 2x the
    routed rows' 3 matmuls). On CPU, ragged_dot lowers to a dense all-experts product: its FLOPs grow with E."""
    ideal = lambda k: 256 * k * 3 * 2 * 64 * 128  # noqa: E731  routed rows x (gate, up, down) matmuls
    by_k = {k: _flops(8, k, "tiled") for k in (1, 4)}
    by_e = {e: _flops(e, 2, "tiled") for e in (4, 16)}
    assert 3.0 < by_k[4] / by_k[1] < 5.0
    assert by_e[16] / by_e[4] < 1.3
    assert all(ideal(k) <= c <= 2.3 * ideal(k) for k, c in [(1, by_k[1]), (4, by_k[4]), (2, by_e[4]), (2, by_e[16])])
    if jax.default_backend() == "cpu":
        ragged = {e: _flops(e, 2, "ragged") for e in (4, 16)}
        assert ragged[16] / ragged[4] > 3.0  # the dense fallback (see benchmarks/RESULTS.md)


# ----------------------------------------------------------------------------- parity with transformers


def _layer0(model):
    graphdef, state = nnx.split(model.layers.mlp)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


@pytest.mark.parametrize("family,norm", [("mixtral", True), ("qwen3_moe", False), ("qwen3_moe", True)])
def test_moe_block_matches_transformers(family, norm, tmp_path):
    """Layer 0's sparse block vs transformers' (output and router logits), each family's normalization."""
    model_type, overrides = MOE_FAMILIES[family]
    if model_type == "qwen3_moe":
        overrides = {**overrides, "norm_topk_prob": norm}
    hf = tiny_hf(model_type, **overrides)
    model = load_hf(save(hf, tmp_path))
    assert model.config.moe.norm_topk_prob == norm
    x = np.random.default_rng(3).standard_normal((2, 7, 64)).astype(np.float32)
    with torch.no_grad():
        block = hf.model.layers[0].mlp
        expected = block(torch.as_tensor(x)).numpy()
        logits_ref = block.gate(torch.as_tensor(x).reshape(-1, 64))[0].numpy()
    y, logits = _layer0(model)(jnp.asarray(x))
    assert max_diff(y, expected) <= LAYER_TOL
    assert max_diff(logits.reshape(-1, logits.shape[-1]), logits_ref) <= LAYER_TOL


@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def run(request, tmp_path_factory):
    """Per family: ftjax logits of the parity batch (both grouped paths) and the transformers references."""
    model_type, overrides = MOE_FAMILIES[request.param]
    hf = tiny_hf(model_type, **overrides)
    model = load_hf(save(hf, tmp_path_factory.mktemp(request.param)))
    ids, seg, pos = _batch()
    ours = {impl: jax_logits(with_implementation(model, impl), ids, pos, seg) for impl in ("tiled", "ragged")}
    ref, ref_segments = hf_references(hf, ids, seg, pos)
    return dict(name=request.param, ours=ours, ref=ref, ref_segments=ref_segments, hf=hf, model=model)


@pytest.mark.parametrize("implementation", ["tiled", "ragged"])
def test_logits_match_transformers(run, implementation):
    """Plain rows, a right-padded row, a left-padded row and a packed row of two segments."""
    ours, ref = run["ours"][implementation], run["ref"]
    assert max_diff(ours[:2], ref[:2]) <= MODEL_TOL and np.abs(ref[:2]).max() > 0.5
    assert max_diff(ours[2, :T - PAD_RIGHT], ref[2, :T - PAD_RIGHT]) <= MODEL_TOL
    assert max_diff(ours[3, PAD_LEFT:], ref[3, PAD_LEFT:]) <= MODEL_TOL
    first, second = run["ref_segments"]
    assert max_diff(ours[4, :CUT], first[0]) <= MODEL_TOL and max_diff(ours[4, CUT:], second[0]) <= MODEL_TOL


def test_config_mapping(run):
    cfg, hf_cfg = run["model"].config, run["hf"].config
    assert cfg.moe.num_experts == hf_cfg.num_experts and cfg.moe.top_k == hf_cfg.num_experts_per_tok
    assert cfg.moe.intermediate_size == 32 and cfg.qk_norm == (run["name"] == "qwen3_moe")
    assert cfg.moe.norm_topk_prob == (run["name"] == "mixtral")


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_kv_cache_decoding_matches_full_forward(run):
    check_kv_cache_matches_full_forward(run["model"])


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_both_expert_layouts_load_the_same_weights(family, tmp_path):
    """Per-expert tensors (what the Hub and transformers' save_pretrained write) and transformers 5's
    fused 3-D experts (save_original_format=False) load into identical params."""
    model_type, overrides = MOE_FAMILIES[family]
    hf = tiny_hf(model_type, **overrides)
    per_expert, fused = tmp_path / "per_expert", tmp_path / "fused"
    hf.save_pretrained(per_expert)
    hf.save_pretrained(fused, save_original_format=False)
    from ftjax.interop.hf import tensor_source

    names = tensor_source(per_expert).names()
    marker = "block_sparse_moe.experts.3.w2.weight" if family == "mixtral" else "mlp.experts.7.down_proj.weight"
    assert f"model.layers.1.{marker}" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensor_source(fused).names()
    a, b = nnx.state(load_hf(per_expert)), nnx.state(load_hf(fused))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    gate_up = hf.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()  # [E, 2F, D]
    np.testing.assert_array_equal(np.asarray(a["layers"]["mlp"]["experts"]["up_proj"][...][1]),
                                  gate_up[:, 32:].transpose(0, 2, 1))


def test_missing_expert_and_dense_layers_fail_in_one_line(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    model_type, overrides = MOE_FAMILIES["qwen3_moe"]
    hf = tiny_hf(model_type, **overrides)
    folder = save(hf, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"tensor model.layers.1.mlp.experts.5.up_proj.weight is missing$"):
        load_hf(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [1]}))
    with pytest.raises(LoadError, match="mlp_only_layers=\\[1\\].*not supported") as e:
        load_hf(folder)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- export


def _tuned(model, targets="q_proj,v_proj,o_proj", seed=2):
    """A copy with adapters on `targets`, every B non-zero (the experts' adapters too)."""
    from ftjax.lora import apply_lora
    from hf_helpers import randomize_lora_b

    model = randomize_lora_b(apply_lora(nnx.clone(model), 4, 8.0, targets=targets, rngs=nnx.Rngs(seed)), seed=seed)
    experts = model.layers.mlp.experts
    for i, adapter in enumerate(a for a in (experts.gate_up_lora, experts.down_lora) if a is not None):
        adapter.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(20 + i), adapter.lora_b[...].shape)
    return model


def test_hf_export_loads_in_transformers_with_ftjax_logits(run, tmp_path):
    """Attention and expert LoRA merged (each expert's adapter folded into that expert's tensors, to the bytes of
    exporting `ftjax.lora.merged`), experts written per expert under the Hub's names (what transformers' own
    save_pretrained writes), config.json built from the model: transformers loads every tensor, none missing or
    unexpected, to the family's config and ftjax's logits."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from ftjax.lora import merged
    from test_export import LORA_MARGIN

    model = _tuned(run["model"], "q_proj,v_proj,experts")
    out = export_hf(model, tmp_path / "out")
    ours = load_file(out / "model.safetensors")
    folded = load_file(export_hf(merged(model), tmp_path / "merged") / "model.safetensors")
    assert ours.keys() == folded.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], folded[name], err_msg=name)
    theirs, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ids = random_ids(2, T, seed=6)
    got = hf_logits(theirs.eval(), ids)
    assert max_diff(got, jax_logits(model, ids)) <= MODEL_TOL and max_diff(got, hf_logits(run["hf"], ids)) > LORA_MARGIN
    ref = run["hf"].config
    for key in ("num_experts_per_tok", "num_local_experts", "num_experts", "norm_topk_prob", "moe_intermediate_size",
                "intermediate_size", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "sliding_window",
                "use_sliding_window"):
        assert getattr(theirs.config, key, None) == getattr(ref, key, None), key
    run["hf"].save_pretrained(tmp_path / "hub")
    names = lambda folder: set(safe_open(folder / "model.safetensors", "np").keys())  # noqa: E731
    assert names(out) == names(tmp_path / "hub")


def test_exported_folder_loads_back_into_ftjax_identically(run, tmp_path):
    """Merged export (the source's config.json carried, shards of 100 KB) -> ftjax: every weight bit-equal."""
    from ftjax.lora import merged

    source = save(run["hf"], tmp_path / "source")
    model = merged(_tuned(run["model"]))
    out = export_hf(model, tmp_path / "out", source=source, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    back = load_hf(out)
    assert back.config.replace(extra=()) == model.config.replace(extra=())
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


@pytest.mark.parametrize("run", ["qwen3_moe"], indirect=True)
@pytest.mark.parametrize("targets", ["q_proj,v_proj,o_proj", "q_proj,v_proj,experts"])
def test_export_of_a_model_split_fsdp_by_expert_equals_the_unsharded_export(run, targets, tmp_path):
    """Experts (and their adapters) split over `expert` and fsdp: each expert's tensor is fetched (its adapter
    folded in) to the same bytes as on one device."""
    from safetensors.numpy import load_file

    model = _tuned(run["model"], targets)
    plain = load_file(export_hf(model, tmp_path / "plain") / "model.safetensors")
    graphdef, state = nnx.split(model)
    mesh = make_mesh(1, 4, 1, expert=2, devices=jax.devices()[:8])
    shardings = state_shardings(state, mesh)  # the default rules place `expert` on the expert axis
    experts = shardings["layers"]["mlp"]["experts"]
    assert experts["down_proj"].spec[1] == "expert"
    assert "experts" not in targets or experts["gate_up_lora"]["lora_a"].spec[1] == "expert"
    out = export_hf(nnx.merge(graphdef, jax.device_put(state, shardings)), tmp_path / "sharded")
    sharded = load_file(out / "model.safetensors")
    assert sharded.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(sharded[name], plain[name], err_msg=name)


def test_config_built_from_a_model_config_maps_back_to_it(run):
    """Without an HF source, the built config.json maps back onto the same ModelConfig, also through
    transformers' own config class."""
    from transformers import AutoConfig

    from ftjax.interop.hf_config import config_from_model
    from ftjax.models.registry import config_from_hf

    cfg = run["model"].config.replace(extra=())
    assert config_from_hf(config_from_model(cfg)) == cfg
    assert config_from_hf(AutoConfig.for_model(**config_from_model(cfg)).to_dict()).replace(extra=()) == cfg


def test_export_refusals_are_one_line(run, tmp_path):
    """GGUF (llama.cpp's MoE layout is not written; with expert adapters too) and LoRA params that the HF merge
    would drop are refused."""
    from ftjax.interop.export_gguf import export_gguf

    for tuned in (run["model"], _tuned(run["model"], "q_proj,experts")):
        with pytest.raises(ConfigError, match=f"llama.cpp has no architecture for model_type '{run['name']}'") as e:
            export_gguf(tuned, tmp_path / "m.gguf")
        assert "\n" not in str(e.value)
    model = _tuned(run["model"], "experts")  # the experts' own adapters are merged; a stray LoRA param is not
    model.layers.mlp.experts.gate_lora = nnx.LoRAParam(jnp.zeros((2, 4, 64, 2)))
    refused = "LoRA params that adapt neither a Linear nor an expert weight cannot be merged .*gate_lora"
    with pytest.raises(ConfigError, match=refused) as e:
        export_hf(model, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("run", ["qwen3_moe"], indirect=True)
def test_export_script_refuses_gguf_of_a_moe_run_in_one_line_before_loading(run, tmp_path):
    """scripts/export.py --format=gguf of an expert-LoRA run: exit 2 and one line, before any checkpoint is read
    (this workdir has none)."""
    from loop_helpers import load_config
    from test_export import _export_script

    c = load_config()
    c.model.path, c.lora.targets = str(save(run["hf"], tmp_path / "m")), "q_proj,experts"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(c.to_json_best_effort())
    proc = _export_script(f"--workdir={tmp_path / 'run'}", "--format=gguf", f"--out={tmp_path / 'm.gguf'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "llama.cpp has no architecture for model_type 'qwen3_moe'" in lines[0]
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------- balance loss


def test_balance_loss_matches_transformers():
    """Same router logits (3 layers, 2x9 tokens, 8 experts, top-2), with and without a padding mask."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = np.random.default_rng(0).standard_normal((3, 2 * 9, 8)).astype(np.float32) * 2.0
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    for m in (None, mask):
        ref = load_balancing_loss_func(tuple(torch.as_tensor(lg) for lg in logits), 8, 2,
                                       None if m is None else torch.as_tensor(m))
        ours = M.load_balancing_loss(jnp.asarray(logits), 2, None if m is None else jnp.asarray(m))
        assert abs(float(ours) - float(ref)) <= LAYER_TOL * float(ref)


def test_model_router_logits_and_aux_loss_match_transformers(run):
    """The router logits of one forward pass and the aux loss transformers computes from them."""
    hf, model = run["hf"], run["model"]
    ids = random_ids(2, T, seed=4)
    mask = np.ones((2, T), np.int64)
    mask[1, T - 3:] = 0
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True)
    _, logits = model.hidden_and_router_logits(jnp.asarray(ids, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32))
    assert logits.shape == (2, 2, T, model.config.moe.num_experts)
    for layer, ref in enumerate(out.router_logits):
        real = mask.reshape(-1) > 0  # padded rows attend differently in transformers
        assert max_diff(np.asarray(logits[layer]).reshape(-1, ref.shape[-1])[real], ref.numpy()[real]) <= MODEL_TOL
    aux = M.load_balancing_loss(logits, model.config.moe.top_k, jnp.asarray(mask))
    assert abs(float(aux) - float(out.aux_loss)) <= MODEL_TOL * float(out.aux_loss)


def _padded_batch(rows, length, vocab, seed=0):
    """Unpacked rows with right-padded tails of different lengths (padding: segment 0, no loss)."""
    from train_helpers import make_batch

    batch = make_batch(rows, length, seed=seed, vocab=vocab, packed=False)
    for r in range(rows):
        batch["segment_ids"][r, length - 1 - r % 4:] = 0
        batch["loss_weights"][r, length - 1 - r % 4:] = 0.0
    return batch


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
@pytest.mark.parametrize("run", ["mixtral"], indirect=True)
def test_router_balance_term_in_the_step_matches_transformers(run):
    """The step's loss and gradients (router logits from its one forward pass) = token CE + w · transformers'
    load_balancing_loss_func on the same router logits, logged as `router_balance`; with grad_accum=2 the term
    is the mean of the two micro-batches' transformers losses."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from ftjax.train.compose import compose, loss_terms
    from ftjax.train.optimizer import make_optimizer
    from ftjax.train.state import place_state
    from ftjax.train.step import make_train_step

    model, moe = run["model"], run["model"].config.moe
    batch = _padded_batch(8, 12, vocab=128)
    config = _step_config("unused", fsdp=1)
    config.moe.router_aux_weight = 0.5  # large enough to move the gradients
    assert [t.name for t in loss_terms(compose(config, devices=jax.devices()[:1]))] == ["loss"]  # no model: no balance
    graphdef, params = nnx.split(model)

    def hf_balance(router_logits, rows):
        logits = tuple(torch.as_tensor(np.array(lg[rows]).reshape(-1, moe.num_experts)) for lg in router_logits)
        mask = torch.as_tensor(batch["segment_ids"][rows] > 0)
        return float(load_balancing_loss_func(logits, moe.num_experts, moe.top_k, mask))

    def reference(params):
        m = nnx.merge(graphdef, params)
        h, router_logits = m.hidden_and_router_logits(batch["input_ids"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(m.logits(h), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        ce = jnp.sum(nll * batch["loss_weights"]) / jnp.sum(batch["loss_weights"])
        return ce + 0.5 * M.load_balancing_loss(router_logits, moe.top_k, batch["segment_ids"] > 0), (ce,
                                                                                                   router_logits)

    (ref_total, (ref_ce, router_logits)), ref_grads = jax.value_and_grad(reference, has_aux=True)(params)
    balance = hf_balance(router_logits, slice(None))
    assert abs(float(ref_total) - (float(ref_ce) + 0.5 * balance)) <= 1e-5 * float(ref_total)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    for grad_accum in (1, 2):
        config.train.grad_accum = grad_accum
        terms = loss_terms(compose(config, devices=jax.devices()[:1]), model.config)
        assert [t.name for t in terms] == ["loss", "router_balance"] and terms[1].weight == 0.5
        optimizer = make_optimizer(config.optim, 10)
        state = place_state(nnx.clone(model), optimizer.tx, mesh)
        step = make_train_step(state, optimizer, mesh, terms=terms, grad_accum=grad_accum)
        before = jax.tree.map(np.asarray, state.trainable)
        after, _, metrics = step(state.trainable, state.opt_state, state.frozen, batch, jax.random.key(0))
        if grad_accum == 1:
            assert abs(float(metrics["loss"]) - float(ref_ce)) <= 1e-5 * float(ref_ce)
            assert abs(float(metrics["router_balance"]) - balance) <= 1e-5 * balance
            assert abs(float(metrics["loss_total"]) - float(ref_total)) <= 1e-5 * float(ref_total)
            grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, after)  # sgd, lr 1
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
                assert max_diff(a, b) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))
        else:  # micro-batch i holds rows i, i+2, ... (ftjax.train.step.micro_batches)
            mean = (hf_balance(router_logits, slice(0, None, 2)) + hf_balance(router_logits, slice(1, None, 2))) / 2
            assert abs(float(metrics["router_balance"]) - mean) <= 1e-5 * mean and abs(mean - balance) > 1e-4
    assert config.moe.router_aux_weight is not None and default_config().moe.router_aux_weight is None
    config.moe.router_aux_weight = None  # unset: the model's own coefficient (transformers' router_aux_loss_coef)
    assert loss_terms(compose(config, devices=jax.devices()[:1]), model.config)[1].weight == run["hf"].config.router_aux_loss_coef
    config.moe.router_aux_weight = 0.0
    assert [t.name for t in loss_terms(compose(config, devices=jax.devices()[:1]), model.config)] == ["loss"]


# ----------------------------------------------------------------------------- training and sharding


def _loss_fn(graphdef, batch, balance_weight=0.01):
    """Token cross-entropy plus the weighted balance loss, from one forward pass."""

    def loss(params, *more_params):
        model = nnx.merge(graphdef, params, *more_params)
        h, router_logits = model.hidden_and_router_logits(batch["input_ids"], batch["positions"],
                                                          batch["segment_ids"])
        logp = jax.nn.log_softmax(model.logits(h), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        w = batch["loss_weights"]
        balance = M.load_balancing_loss(router_logits, model.config.moe.top_k, batch["segment_ids"] > 0)
        return jnp.sum(nll * w) / jnp.sum(w) + balance_weight * balance

    return loss


def _step_config(folder, method="full", targets="experts", **mesh):
    """Fine-tuning of the model in `folder` (full, or LoRA on `targets`) by plain SGD at lr 1 (the update is minus
    the gradient)."""
    c = default_config()
    c.model.path, c.method, c.model.dtype, c.lora.targets = str(folder), method, "float32", targets
    c.optim.update(dict(name="sgd", lr=1.0, schedule="constant", momentum=0.0, clip_norm=0.0))
    c.mesh.update(dict(data=1, **mesh))
    return validate(c)


def _one_step(config, batch, mesh=None):
    """(metrics, gradients, trainable shardings) of one train step built from `config` (its mesh by default)."""
    from ftjax.train.compose import compose, loss_terms
    from ftjax.train.setup import build_state
    from ftjax.train.step import make_train_step

    mesh = mesh or mesh_from_config(config.mesh)
    run = compose(config, devices=list(mesh.devices.flat))
    setup = build_state(run, mesh)
    state = setup.state
    terms = loss_terms(run, setup.model_config)
    step = make_train_step(state, setup.optimizer, mesh, terms=terms, rules=setup.rules)
    before = jax.tree.map(np.asarray, state.trainable)
    after, _, metrics = step(state.trainable, state.opt_state, state.frozen,
                             jax.device_put(batch, step.batch_sharding), jax.random.key(0))
    grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, after)  # sgd, lr 1: after = before - grad
    return jax.device_get(metrics), grads, state.shardings.trainable


@pytest.mark.slow  # ~20-30 s each: two whole-model train-step compiles, one over 8 devices
@pytest.mark.parametrize("run", ["qwen3_moe"], indirect=True)
@pytest.mark.parametrize("method,weight", [("full", "gate_proj"), ("lora", "gate_up_lora")])
def test_same_loss_on_one_device_and_eight_split_fsdp_by_expert(run, method, weight, tmp_path):
    """Loss and gradients of every trained weight (full fine-tuning, or LoRA on q/v and the experts) on 1 device
    = on 8 simulated devices, fsdp 4 x expert 2 (experts split over `expert`, tokens over both), through the
    train step built from the config alone."""
    from train_helpers import make_batch

    folder = save(run["hf"], tmp_path / "m")
    batch = make_batch(8, 12, vocab=128)
    with pytest.raises(ConfigError, match="mesh.expert=3 does not divide the model's 8 experts"):
        validate_for_model(_step_config(folder, fsdp=1, expert=3), run["model"].config)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    targets = "q_proj,v_proj,experts"
    ref_metrics, ref_grads, _ = _one_step(_step_config(folder, method, targets, fsdp=1, expert=1), batch, one)
    metrics, grads, shardings = _one_step(_step_config(folder, method, targets, fsdp=4, expert=2), batch)
    assert "router_balance" in metrics
    placed = shardings["layers"]["mlp"]["experts"][weight]
    placed = placed if method == "full" else placed["lora_a"]
    assert placed.spec[1] == "expert" and len(placed.mesh.devices.reshape(-1)) == 8
    for name, ref in ref_metrics.items():
        if name in ("loss", "loss_total", "router_balance"):
            assert abs(float(metrics[name]) - float(ref)) <= 1e-5 * float(ref), name
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 1e-3
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert max_diff(a, b) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))


@pytest.mark.parametrize("run", ["mixtral"], indirect=True)
@pytest.mark.parametrize("targets", ["q_proj,k_proj,v_proj,o_proj", "q_proj,v_proj,experts"])
def test_lora_learns_with_router_and_experts_frozen(run, targets):
    """A short LoRA run (attention adapters, or some with the experts' gate|up and down adapters; the balance term
    added) memorizes a batch; the router and the experts' own weights are outside the trainable set."""
    import optax

    from ftjax.lora import apply_lora
    from ftjax.methods import Lora

    model = nnx.clone(run["model"])
    model.lm_head.kernel[...] = 30.0 * model.lm_head.kernel[...]  # pre-trained-like head scale
    apply_lora(model, 4, 8.0, targets=targets, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = nnx.split(model, Lora.trainable, ...)
    paths = {p[-1] for p, _ in nnx.to_flat_state(trainable)}
    assert paths == {"lora_a", "lora_b"}
    adapted = {p[-2] for p, _ in nnx.to_flat_state(trainable)}
    assert ({"gate_up_lora", "down_lora"} <= adapted) == ("experts" in targets)
    assert {"router", "gate_proj", "up_proj", "down_proj"} <= {p[-1] for p, _ in nnx.to_flat_state(frozen)}
    from train_helpers import make_batch

    batch = {k: jnp.asarray(v) for k, v in make_batch(4, 12, vocab=128).items()}
    tx = optax.adam(2e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(lambda t: _loss_fn(graphdef, batch)(t, frozen))(trainable)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(30):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[0] > 3.5 and losses[-1] < 0.5 * losses[0]
    trained_b = [float(jnp.abs(v[...]).max()) for p, v in nnx.to_flat_state(trainable)
                 if p[-2:] == ("down_lora", "lora_b")]
    assert len(trained_b) == ("experts" in targets) and all(b > 1e-3 for b in trained_b)  # the experts' adapters moved


@pytest.mark.parametrize("run", ["mixtral"], indirect=True)
def test_attention_lora_exports_to_peft_with_ftjax_logits(run, tmp_path):
    """Adapters on attention only: the PEFT folder loads onto transformers' Mixtral with ftjax's logits."""
    from peft import PeftModel

    from ftjax.interop.peft import export_peft
    from test_export import LORA_MARGIN

    model = _tuned(run["model"])
    out = export_peft(model, tmp_path / "adapter")
    ids = random_ids(2, T, seed=6)
    base = hf_logits(run["hf"], ids)
    theirs = hf_logits(PeftModel.from_pretrained(copy.deepcopy(run["hf"]), str(out)).eval(), ids)
    assert max_diff(theirs, jax_logits(model, ids)) <= MODEL_TOL and max_diff(theirs, base) > LORA_MARGIN


@pytest.mark.parametrize("run,targets", [("mixtral", "q_proj,v_proj,experts"), ("qwen3_moe", "q_proj,v_proj,experts"),
                                         ("mixtral", "experts.down_proj")], indirect=["run"])
def test_expert_lora_exports_to_peft_target_parameters_with_ftjax_logits(run, targets, tmp_path):
    """Expert adapters (with attention adapters, or alone): the PEFT folder (target_parameters on the fused
    experts) loads onto transformers' model with ftjax's logits, and back into ftjax with the same adapters."""
    import json

    from peft import PeftModel

    from ftjax.interop.peft import export_peft, load_peft
    from test_export import LORA_MARGIN

    model = _tuned(run["model"], targets)
    out = export_peft(model, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    want = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"] if targets.endswith(",experts") else [
        "mlp.experts.down_proj"]
    assert config["target_parameters"] == want
    ids = random_ids(2, T, seed=6)
    base = hf_logits(run["hf"], ids)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(run["hf"]), str(out)).eval()
    theirs = hf_logits(peft_model, ids)
    assert max_diff(theirs, jax_logits(model, ids)) <= MODEL_TOL and max_diff(theirs, base) > LORA_MARGIN
    back = load_peft(nnx.clone(run["model"]), out)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back, nnx.LoRAParam), nnx.state(model, nnx.LoRAParam))


@pytest.mark.slow  # ~10-15 s: a whole loop run (data, 8-device compile, 8 steps)
@pytest.mark.parametrize("run", ["qwen3_moe"], indirect=True)
def test_lora_run_over_fsdp_by_expert_learns_and_logs_the_balance_term(run, tmp_path):
    """`ftjax.train.loop.run` on a Qwen3-MoE folder with the default LoRA targets (attention + experts), over
    fsdp 4 x expert 2: the loss falls and metrics.jsonl logs `router_balance` beside it (transformers' definition
    gives top_k for a perfectly balanced router; this random one stays near it)."""
    import json

    from ftjax.train.loop import run as train
    from hf_helpers import tiny_tokenizer
    from loop_helpers import load_config, metrics

    folder = save(run["hf"], tmp_path / "m")
    tiny_tokenizer().save_pretrained(folder)
    rng = np.random.default_rng(0)
    records = [{"text": " ".join(f"w{(start + i) % 40}" for i in range(24))} for start in rng.integers(0, 40, 64)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    c = load_config("tiny_test")
    c.model.path, c.data.train, c.data.eval, c.data.seq_len = str(folder), str(tmp_path / "train.jsonl"), None, 32
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 4, 2
    c.checkpoint.every, c.train.steps, c.optim.lr = 0, 8, 3e-2
    train(c, tmp_path / "run")
    logged = metrics(tmp_path / "run")
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"]
    top_k = run["model"].config.moe.top_k
    assert all(0.9 * top_k < m["router_balance"] < 2.0 * top_k for m in logged)
    first = logged[0]  # the model's router_aux_loss_coef: transformers' default 0.001
    assert abs(first["loss_total"] - first["loss"] - 0.001 * first["router_balance"]) <= 1e-5 * first["loss"]
