"""QLoRA: a LoRA model on a quantized frozen base computes what the same model computes with its weights
quantized then dequantized to fp32 (logits, loss, LoRA gradients), without keeping more than one layer's
full-precision weights in the compiled step; config, mesh and source errors in one line before compute."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ftjax.config import LORA_TARGETS, default_config, validate
from ftjax.errors import ConfigError
from ftjax.interop.quantized_base import FrozenQuant, quantize_in_place
from ftjax.lora import apply_lora, frozen_quant_kernels, merged
from ftjax.models.llama import Llama, ModelConfig
from ftjax.quant.weight import QuantizedParam, QuantizedWeight
from hf_helpers import randomize_lora_b
from train_helpers import make_batch

# contraction sizes (hidden 64, heads 64, mlp 128) hold whole 64-value NF4 blocks
CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)
TOL = 1e-4  # fp32, a whole model


def lora_models(scheme: str, targets: str | None = LORA_TARGETS, cfg: ModelConfig = CFG):
    """(quantized-base LoRA model, the same model with every quantized kernel replaced by its dequantized
    fp32 value): same adapters, non-zero B."""
    model = Llama(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, 4, 8.0, targets=LORA_TARGETS, rngs=nnx.Rngs(1))
    randomize_lora_b(model, seed=2)
    quantized = quantize_in_place(nnx.clone(model), FrozenQuant(scheme, targets), None, None)
    reference = nnx.clone(model)
    dense = dict(frozen_quant_kernels(reference, targets))
    for path, linear in frozen_quant_kernels(quantized, targets):
        assert isinstance(linear.kernel, QuantizedParam)
        dense[path].kernel[...] = jax.jit(QuantizedWeight.dequantize)(linear.kernel.get_value())
    return quantized, reference


def logits_loss_and_lora_grads(model: nnx.Module, batch: dict):
    """(logits, weighted cross-entropy, its gradient w.r.t. the LoRA params): one compiled pass."""
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def loss(t):
        m = nnx.merge(graphdef, t, frozen)
        logits = m(batch["input_ids"], batch["positions"], batch["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["loss_weights"]) / jnp.sum(batch["loss_weights"]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return logits, value, grads


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_quantized_base_equals_the_dequantized_fp32_model(scheme):
    """Logits, loss and every LoRA gradient of the quantized-base model equal the dequantized model's."""
    quantized, reference = lora_models(scheme)
    batch = {k: jnp.asarray(v) for k, v in make_batch(4, 16, vocab=CFG.vocab_size).items()}
    (got, loss_q, grads_q), (want, loss_r, grads_r) = (logits_loss_and_lora_grads(m, batch)
                                                       for m in (quantized, reference))
    assert float(jnp.max(jnp.abs(got - want))) <= TOL
    assert abs(float(loss_q) - float(loss_r)) <= TOL
    flat_q, flat_r = jax.tree.leaves(grads_q), jax.tree.leaves(grads_r)
    assert len(flat_q) == len(flat_r) == 2 * 7  # A and B of the 7 targets (stacked over layers)
    for g, r in zip(flat_q, flat_r):
        assert float(jnp.max(jnp.abs(g - r))) <= TOL * max(1.0, float(jnp.max(jnp.abs(r))))
    # and the quantized model is not the full-precision one (the comparison is not vacuous)
    dense = Llama(CFG, rngs=nnx.Rngs(0))
    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]
    assert float(jnp.max(jnp.abs(jax.jit(lambda m: m(ids, positions, segments))(dense) - want))) > 10 * TOL


def test_scope_selects_the_lora_targets_or_every_linear_but_the_head():
    model = Llama(dataclasses.replace(CFG, tie_word_embeddings=False), rngs=nnx.Rngs(0))
    targets = [p for p, _ in frozen_quant_kernels(model, "q_proj,v_proj")]
    assert targets == ["layers.self_attn.q_proj", "layers.self_attn.v_proj"]
    every = [p for p, _ in frozen_quant_kernels(model, None)]
    assert len(every) == 7 and "lm_head" not in every


def test_config_errors_in_one_line():
    c = default_config()
    c.method, c.train.frozen_quant = "full", "nf4"
    with pytest.raises(ConfigError, match="frozen_quant=nf4 quantizes the frozen base of a LoRA run"):
        validate(c)
    c = default_config()
    c.model.path, c.train.frozen_quant = "tiny-random-llama", "gguf"
    with pytest.raises(ConfigError, match="model.path=tiny-random-llama is not one"):
        validate(c)
    c = default_config()
    c.train.frozen_quant = "q4"
    with pytest.raises(ConfigError, match="train.frozen_quant='q4' is not one of none, int8, nf4, gguf"):
        validate(c)


def test_a_mesh_that_splits_a_block_or_a_short_contraction_is_refused_before_reading():
    from ftjax.sharding import make_mesh

    model = Llama(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="nf4: sharding logical axis 'embed' \\(64\\) 8 ways"):
        quantize_in_place(model, FrozenQuant("nf4", "q_proj"), make_mesh(data=1, fsdp=8, tensor=1), None)
    narrow = Llama(dataclasses.replace(CFG, hidden_size=32, head_dim=8), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="layers.self_attn.q_proj has a contraction size of 32"):
        quantize_in_place(narrow, FrozenQuant("nf4", "q_proj"), None, None)
    assert not isinstance(narrow.layers.self_attn.q_proj.kernel, QuantizedParam)  # nothing half-done


def _step_temp_bytes(scheme: str | None, remat: str) -> tuple[int, int]:
    """(temp bytes of the compiled LoRA train step, one layer's fp32 frozen kernel bytes) on one device."""
    from ftjax.sharding import make_mesh
    from ftjax.train.optimizer import make_optimizer
    from ftjax.train.state import place_state
    from ftjax.train.step import make_train_step

    cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=512, num_layers=4, head_dim=64, remat=remat)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, 4, 8.0, targets=LORA_TARGETS, rngs=nnx.Rngs(1))
    layer_bytes = sum(lin.kernel.get_value()[0].nbytes for _, lin in frozen_quant_kernels(model, LORA_TARGETS))
    if scheme is not None:
        quantize_in_place(model, FrozenQuant(scheme, LORA_TARGETS), None, None)
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    c = default_config()
    optimizer = make_optimizer(c.optim, 10)
    state = place_state(model, optimizer.tx, mesh, trainable=nnx.LoRAParam)
    step = make_train_step(state, optimizer, mesh)
    batch = make_batch(2, 32, vocab=cfg.vocab_size)
    compiled = step.lower(state.trainable, state.opt_state, state.frozen, batch, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes, layer_bytes


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_the_step_keeps_one_layer_of_dequantized_weights_at_a_time():
    """Temporaries of the nf4-base step < the fp32-base step's + one layer's full-precision frozen kernels
    (the four-layer stack dequantized at once, or kept for the backward pass, would exceed it: without the
    rematerialized product, 17.4 MB against 10.1 + 2.4 MB). remat=none: no outer remat hides it."""
    base, layer = _step_temp_bytes(None, "none")
    quantized, _ = _step_temp_bytes("nf4", "none")
    assert quantized < base + layer, (quantized, base, layer)


def _state_bytes(model: nnx.Module) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))


def _quantized_bytes(model: nnx.Module) -> tuple[int, int]:
    """(bytes held by the quantized kernels, bytes the same kernels take in fp32)."""
    weights = [lin.kernel.get_value() for _, lin in frozen_quant_kernels(model, None)]
    return sum(w.nbytes for w in weights), sum(4 * int(np.prod(w.shape)) for w in weights)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random transformers Llama written as a Q4_1 GGUF by ftjax's exporter (every linear in Q4_1)."""
    import ftjax
    from ftjax.interop.export_gguf import export_gguf
    from hf_helpers import tiny_hf
    from test_export_gguf import VOCAB, bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny_gguf_src")
    tiny_hf("llama", vocab_size=VOCAB).save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return export_gguf(ftjax.load_model(folder), folder / "m-q4_1.gguf", source=folder, quant="q4_1")


def test_a_gguf_base_kept_in_its_own_blocks_equals_its_dequantized_load(tiny_gguf):
    """frozen_quant=gguf: the file's Q4_1 blocks are the frozen kernels (bytes as shipped: 20 per 32 values),
    sharded over fsdp=2; logits equal the dequantized-fp32 load; fsdp=4 would split a block: refused."""
    from ftjax.interop.sources import load_pretrained
    from ftjax.sharding import make_mesh

    mesh = make_mesh(data=4, fsdp=2, tensor=1)
    dense = load_pretrained(tiny_gguf, "float32", "float32", mesh=mesh)
    kept = load_pretrained(tiny_gguf, "float32", "float32", mesh=mesh, quant=FrozenQuant("gguf", None))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, dense.config.vocab_size, (4, 12)), jnp.int32)
    assert float(jnp.max(jnp.abs(jax.jit(lambda m: m(ids))(kept) - jax.jit(lambda m: m(ids))(dense)))) <= TOL
    q_proj = kept.layers.self_attn.q_proj.kernel.get_value()
    assert q_proj.scheme == "Q4_1" and q_proj.arrays["codes"].sharding.spec[2] == "fsdp"  # [L, out, blocks, bytes]
    held, fp32 = _quantized_bytes(kept)
    assert held * 4 * 32 == fp32 * 20  # exactly the block format's ratio
    assert _state_bytes(dense) - _state_bytes(kept) == fp32 - held
    with pytest.raises(ConfigError, match="Q4_1: sharding logical axis 'embed' \\(64\\) 4 ways"):
        load_pretrained(tiny_gguf, "float32", "float32", mesh=make_mesh(data=2, fsdp=4, tensor=1),
                        quant=FrozenQuant("gguf", None))


@pytest.mark.slow
def test_smollm2_gguf_trained_on_as_shipped(smollm2_gguf_path):
    """The real SmolLM2 GGUF with frozen_quant=gguf (every linear in its Q4_1 blocks): logits equal the
    dequantized-fp32 load within 1e-4; frozen-state bytes lower by exactly Q4_1's ratio on those kernels."""
    from ftjax.interop.sources import load_pretrained

    dense = load_pretrained(smollm2_gguf_path, "float32", "float32")
    kept = load_pretrained(smollm2_gguf_path, "float32", "float32", quant=FrozenQuant("gguf", None))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, dense.config.vocab_size, (2, 24)), jnp.int32)
    assert float(jnp.max(jnp.abs(jax.jit(lambda m: m(ids))(kept) - jax.jit(lambda m: m(ids))(dense)))) <= TOL
    held, fp32 = _quantized_bytes(kept)
    assert held * 4 * 32 == fp32 * 20  # Q4_1: 20 bytes per 32 values
    assert _state_bytes(dense) - _state_bytes(kept) == fp32 - held
    assert _state_bytes(kept) / _state_bytes(dense) < 0.5  # the Q8_0 embedding stays dequantized (fp32)


def test_a_quantized_base_is_another_base_for_the_caches():
    """Cached base replies and baselines (workdir and $FTJAX_CACHE) are keyed apart per quantization."""
    from ftjax.evaluation.run import Evaluation
    from ftjax.train.compose import eval_settings, model_id
    from hf_helpers import tiny_tokenizer

    def keys(**train):
        c = default_config()
        c.model.path = "tiny-random-llama"
        for k, v in train.items():
            c.train[k] = v
        return model_id(c), Evaluation(eval_settings(c), tiny_tokenizer(), "/nonexistent", write=False)._base_identity()

    plain, nf4, int8 = keys(), keys(frozen_quant="nf4"), keys(frozen_quant="int8")
    every = keys(frozen_quant="nf4", frozen_quant_scope="all_linears")
    assert len({plain[0], nf4[0], int8[0], every[0]}) == 4
    assert len({str(plain[1]), str(nf4[1]), str(int8[1]), str(every[1])}) == 4
    assert "frozen_quant" not in plain[1]["base"]  # a full-precision base keeps its existing cache keys


def test_the_report_says_its_base_is_the_quantized_base():
    from ftjax.evaluation.report import _markdown

    report = {"task": {w: {"exact": 0.5, "eval_loss": 1.0} for w in ("base", "prompted", "finetuned")},
              "forgetting": {"kl_to_base": 0.2, "retain_nll_base": 0.3, "retain_nll_finetuned": 0.6},
              "meta": {"few_shot": 3, "base_quant": "nf4 on the LoRA targets q_proj,v_proj"}}
    assert ("Base: the model as trained against, its frozen weights quantized: nf4 on the LoRA targets "
            "q_proj,v_proj; the base columns" in _markdown(report))
    del report["meta"]["base_quant"]
    assert "Base:" not in _markdown(report)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_memory_estimate_counts_the_quantized_base_as_built(scheme):
    """The estimate's frozen bytes: a hand count of the scheme's arrays, and exactly what build_state holds;
    frozen_bytes says what the base would take unquantized."""
    from ftjax.interop.sources import tiny_config
    from ftjax.sharding import make_mesh
    from ftjax.train.compose import compose
    from ftjax.train.memory import estimate, frozen_bytes
    from ftjax.train.setup import build_state
    from loop_helpers import load_config

    c = load_config()
    c.train.frozen_quant = scheme
    cfg = tiny_config()
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    parts = estimate(compose(c, jax.devices()[:1]), cfg, mesh)
    d, q, kv, i, layers = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                           cfg.intermediate_size, cfg.num_layers)
    kernels = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    if scheme == "nf4":  # 4 bits, a byte per 64-block, fp32 scale per 256 blocks, fp32 offset: per layer
        held = layers * sum(n * m // 2 + n * m // 64 + 4 * -(-(n * m // 64) // 256) + 4 for n, m in kernels)
    else:  # a byte per weight, an fp32 scale per output channel
        held = layers * sum(n * m + 4 * m for n, m in kernels)
    dense = layers * sum(n * m for n, m in kernels)
    total = cfg.vocab_size * d + d + layers * 2 * d + dense  # every param (tied embedding)
    assert parts["frozen"] == 4 * (total - dense) + held
    built = build_state(compose(c), mesh).state.frozen
    assert frozen_bytes(built, "float32") == (parts["frozen"], 4 * total)


def test_benchmark_reports_the_bytes_a_quantized_base_saves():
    from ftjax.benchmark import prepare, summarize
    from ftjax.sharding import make_mesh
    from ftjax.train.compose import compose
    from ftjax.train.memory import estimate
    from loop_helpers import load_config

    c = load_config()
    c.mesh.data, c.train.frozen_quant, c.train.batch_size, c.data.seq_len = 1, "nf4", 2, 32
    bench = prepare(c, jax.devices()[:1])
    rec = summarize(bench, [1.0], 1.0, "test")
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    held = estimate(compose(c, jax.devices()[:1]), bench.model_cfg, mesh)["frozen"]  # hand-counted in the test above
    c.train.frozen_quant = "none"
    unquantized = estimate(compose(c, jax.devices()[:1]), bench.model_cfg, mesh)["frozen"]
    assert rec["frozen_bytes"] == held and rec["frozen_bytes_unquantized"] == unquantized
    assert rec["frozen_bytes_saved"] == unquantized - held > 0 and rec["model"]["frozen_quant"] == "nf4"


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_hf_export_of_a_quantized_base_holds_its_dequantized_merged_weights():
    """--format=hf (and gguf, which reads the same plans) from a QLoRA model: every tensor equals the export
    of the same model with the dequantized base, LoRA merged."""
    from ftjax.interop.export_hf import hf_tensor_plans

    quantized, reference = lora_models("nf4")
    got = {p.name: p.fetch() for p in hf_tensor_plans(quantized, "float32")}
    want = {p.name: p.fetch() for p in hf_tensor_plans(reference, "float32")}
    assert got.keys() == want.keys() and len(got) == 3 + 9 * CFG.num_layers  # embedding, final norm, head
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    folded = merged(quantized)  # ftjax.lora.merged: a quantized kernel becomes a plain merged one
    assert not isinstance(folded.layers.mlp.up_proj.kernel, QuantizedParam)
    ids = jnp.arange(12, dtype=jnp.int32)[None]
    logits = jax.jit(lambda m: m(ids))
    assert float(jnp.max(jnp.abs(logits(folded) - logits(merged(reference))))) <= TOL


@pytest.mark.slow
def test_memory_estimate_of_llama3_8b_qlora_is_within_10_percent_of_xla():
    """Llama-3-8B shapes, NF4 base, bf16, remat full, 1 x 2048 tokens: the pre-compile estimate against XLA's
    memory_analysis() of the step compiled on CPU from abstract shapes (nothing allocated); <= 10 GiB."""
    from ftjax.train.compiled_memory import compiled_step_bytes
    from ftjax.train.compose import compose
    from ftjax.train.memory import GIB, estimate

    llama3_8b = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                            num_kv_heads=8, head_dim=128)
    c = default_config()
    c.model.path = "tiny-random-llama"  # shapes come from llama3_8b; the path only names the (unread) base
    c.model.dtype = c.model.param_dtype = c.train.frozen_dtype = "bfloat16"
    c.model.remat, c.model.attention = "full", "xla"
    c.train.frozen_quant, c.train.batch_size, c.data.seq_len = "nf4", 1, 2048
    run = compose(c, jax.devices()[:1])
    estimated = sum(estimate(run, llama3_8b).values())
    compiled = compiled_step_bytes(run, llama3_8b)
    assert abs(estimated - compiled) <= 0.1 * compiled, (estimated / GIB, compiled / GIB)
    assert compiled <= 10 * GIB


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_sharded_qlora_step_equals_one_device():
    """An nf4-base LoRA step on a data=2 x fsdp=2 x tensor=2 mesh (quantized arrays sharded like their kernels,
    blocks whole) gives one device's loss and updated adapters."""
    from ftjax.sharding import make_mesh
    from ftjax.train.optimizer import make_optimizer
    from ftjax.train.state import place_state
    from ftjax.train.step import make_train_step

    cfg = dataclasses.replace(CFG, hidden_size=128, intermediate_size=256, head_dim=32)  # 2 NF4 blocks per split
    batch = make_batch(8, 16, vocab=cfg.vocab_size)
    optimizer = make_optimizer(default_config().optim, 10)

    def one_step(mesh):
        model = Llama(cfg, rngs=nnx.Rngs(0))
        apply_lora(model, 4, 8.0, targets=LORA_TARGETS, rngs=nnx.Rngs(1))
        randomize_lora_b(model, seed=2)
        quantize_in_place(model, FrozenQuant("nf4", None), mesh, None)
        state = place_state(model, optimizer.tx, mesh, trainable=nnx.LoRAParam)
        step = make_train_step(state, optimizer, mesh)
        trainable, _, metrics = step(state.trainable, state.opt_state, state.frozen, batch, jax.random.key(0))
        return float(metrics["loss"]), jax.tree.leaves(jax.device_get(trainable)), state.frozen

    loss_1, adapters_1, _ = one_step(make_mesh(data=1, devices=jax.devices()[:1]))
    loss_8, adapters_8, frozen = one_step(make_mesh(data=2, fsdp=2, tensor=2))
    codes = frozen["layers"]["mlp"]["down_proj"]["kernel"].get_value().arrays["codes"]
    assert codes.sharding.spec[1:] == ("tensor", "fsdp")  # [L, mlp/2, embed]: contraction over tensor
    assert abs(loss_1 - loss_8) <= 1e-5
    for a, b in zip(adapters_1, adapters_8):
        assert float(np.max(np.abs(a - b))) <= 1e-5


def test_a_gguf_weight_whose_layers_mix_block_types_is_refused_in_one_line():
    """llama.cpp's _M files store some layers of a weight in another type: one stacked array cannot hold both."""
    from ftjax.errors import LoadError
    from ftjax.interop.gguf import GGUFRows
    from ftjax.interop.quantized_base import read_quantized

    model = nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0)))
    var = model.layers.mlp.down_proj.kernel
    types = {"model.layers.0.mlp.down_proj.weight": ("Q4_0", 18), "model.layers.1.mlp.down_proj.weight": ("Q8_0", 34)}

    def array(name):
        qtype, size = types[name]
        return GGUFRows(np.zeros((64, 128 // 32 * size), np.uint8), qtype, (64, 128))

    with pytest.raises(LoadError, match="down_proj.weight: its layers are stored as Q4_0, Q8_0; .*use frozen_quant=nf4"):
        read_quantized(FrozenQuant("gguf", None), var, [(name, True) for name in types], array, None, None)


def test_an_hf_folder_is_quantized_layer_by_layer_as_read(tmp_path):
    """load_pretrained(HF folder, quant=nf4) reads each layer's tensor and quantizes it on the host: the same
    arrays as quantizing the loaded full-precision model, placed on a data=4 x fsdp=1 x tensor=2 mesh."""
    from ftjax.interop.sources import load_pretrained
    from ftjax.sharding import make_mesh
    from hf_helpers import tiny_hf

    tiny_hf("llama").save_pretrained(tmp_path)
    mesh = make_mesh(data=4, fsdp=1, tensor=2)
    quant = FrozenQuant("nf4", "q_proj,down_proj")
    read = load_pretrained(tmp_path, "float32", "float32", mesh=mesh, quant=quant)
    after = quantize_in_place(load_pretrained(tmp_path, "float32", "float32", mesh=mesh), quant, mesh, None)
    for (path, a), (_, b) in zip(frozen_quant_kernels(read, None), frozen_quant_kernels(after, None)):
        wa, wb = a.kernel.get_value(), b.kernel.get_value()
        assert isinstance(wa, QuantizedWeight) == (path.split(".")[-1] in ("q_proj", "down_proj")), path
        for x, y in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
            assert x.sharding == y.sharding and np.array_equal(np.asarray(x), np.asarray(y)), path
