"""Per-device memory estimate before anything is compiled: params, optimizer state, activations.

Activations use the per-layer count of Korthikanti et al. (2022) for a pre-norm decoder,
s·b·h·(34 + 5·a·s/h) bytes in 16-bit per layer (the 5·a·s/h score term only for the XLA attention: the
kernels keep no [T, S] blocks), scaled to the compute dtype, without remat; with a remat
policy each layer keeps only what the policy saves (`saved_widths`), plus one layer's worth during its
recomputation. Under tensor parallelism the residual stream is whole on every tensor shard (Korthikanti's
10 of 34). On TPU a dense layer's term, the fp32 head and the fsdp-gathered embedding and head follow XLA's TPU
compile of the large recipes (TPU_LAYER; benchmarks/memory_vs_xla.py: within 15% of each).
Forgetting control: full fine-tuning with forget.kl_weight or forget.l2_weight keeps a step-0 copy of the
trainable weights (`start_copy`); the KL term runs a second (retain) batch through the model, doubling activations.
The objective adds what it holds beyond that (`Objective.memory`: a frozen reference copy, a teacher's weights and
its forward pass (`forward_bytes`), rollouts' KV cache), from the estimate's own per-device figures (`MemoryShapes`); a preference loss under full fine-tuning
reads its reference from a cache and adds nothing.
A quantized base (train.frozen_quant) counts its kernels' own arrays, and one layer of them dequantized among the
activations; `ftjax.train.compiled_memory` checks the whole against XLA's count of the compiled step.
Mixture of experts: the weights are the model's own (all E experts, the router, their adapters); a layer's MLP
term is the routed one (`moe_layer_bytes`): the top-k copies of each token through the experts, over the rows the
grouped matmul really runs (ragged_dot: tokens·k; the tiled path: its padded tiles), their gradients during one
layer's backward, and the fp32 router logits that every layer returns for the balance loss. Sliding windows change
no weight. Against XLA's count of the CPU (tiled) step this is still low, by ~25% at d=1024, 8 layers, E=32,
top-4: XLA holds more of the tiled path per layer than its saved values (benchmarks/RESULTS.md). On a mesh that
splits the batch, the routing sorts the global batch's tokens, and XLA's TPU compile of Qwen3-30B-A3B (fsdp 4 x
expert 2) holds a layer's routed buffers for all of them on every chip (bf16[32·4096·8, 2048]): counted so.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ftjax.config import recipe_module
from ftjax.errors import ConfigError
from ftjax.interop.gguf import gguf_tensor_name, qtype_name, read_gguf_header
from ftjax.interop.sources import resolve
from ftjax.lora import frozen_quant_kernels
from ftjax.metrics.flops import attention_params
from ftjax.methods import Method
from ftjax.models.llama import Llama, ModelConfig
from ftjax.models.moe import grouped_rows, resolved_implementation, tile_rows
from ftjax.models.registry import config_from_hf, hf_tensor_name
from ftjax.objectives import MemoryShapes
from ftjax.platform import device_capacity, platform_of
from ftjax.quant.weight import QuantizedParam, abstract_weight
from ftjax.sharding import batch_shards, state_shardings
from ftjax.train.compose import ModelPart, Run, compose
from ftjax.train.optimizer import make_optimizer

GIB = 1024**3
# One dense layer during its recomputation and backward in XLA's TPU compile, in values per token: (replicated
# over the tensor axis, per hidden unit; split by it, per MLP unit). Fitted to the Llama-3-8B and -70B LoRA recipes
# (v5p, full remat; 70B with tensor 4) and checked on Qwen3-8B (benchmarks/memory_vs_xla.py): its MLP's gate, up
# and products and their gradients (bf16[tokens, 14336] x ~10 in the 8B's buffer assignment) exceed Korthikanti's
# 19·d, which assumes a 4·d GeLU MLP.
TPU_LAYER = (11.5, 7.3)


def _device_bytes(abstract_state, mesh: Mesh, rules: dict, dtype=None) -> int:
    """Bytes one device holds of a sharded state (dtype overrides the leaves' own)."""
    shardings = jax.tree.leaves(state_shardings(abstract_state, mesh, rules))
    leaves = jax.tree.leaves(abstract_state)
    total = 0
    for leaf, sharding in zip(leaves, shardings):
        itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
        total += int(np.prod(sharding.shard_shape(leaf.shape))) * itemsize
    return total


def on_platform(cfg: ModelConfig, platform: str) -> ModelConfig:
    """`cfg` with an MoE's `auto` grouped matmul resolved to the one `platform` runs (not this host's)."""
    if cfg.moe is None:
        return cfg
    return cfg.replace(moe=dataclasses.replace(cfg.moe, implementation=resolved_implementation(
        cfg.moe.implementation, platform)))


def mlp_width(cfg: ModelConfig, tokens: int) -> float:
    """Values per token of each MLP intermediate (gate, up): the intermediate size; an MoE layer: the experts'
    size times the grouped rows per token (top-k, and the tiled path's padding)."""
    if cfg.moe is None:
        return cfg.intermediate_size
    return cfg.moe.intermediate_size * grouped_rows(cfg.moe, tokens) / tokens


def moe_layer_bytes(cfg: ModelConfig, tokens: int, itemsize: int) -> float:
    """What one MoE layer's MLP keeps for the backward pass, `tokens` tokens on a device (no remat): its input and
    the top-k outputs per token; per grouped row the sorted input and output, gate and up; fp32 router
    probabilities and logits, int32 routing indices; the tiled path adds its row masks (1 byte a value) and one
    copy of the gate, up and down weights per (tile, expert) pair."""
    moe, d, f = cfg.moe, cfg.hidden_size, cfg.moe.intermediate_size
    rows = grouped_rows(moe, tokens)
    out = (tokens * itemsize * (d + moe.top_k * d) + rows * itemsize * (2 * d + 2 * f)
           + tokens * (8 * moe.num_experts + 12 * moe.top_k))
    if resolved_implementation(moe.implementation) == "tiled":
        pairs = rows // tile_rows(tokens * moe.top_k, moe.num_experts)
        out += rows * 2 * d + pairs * 3 * d * f * itemsize
    return out


def saved_widths(method: Method, cfg: ModelConfig, tokens: int = 1) -> dict[str, float]:
    """Per remat policy, the values per token one layer keeps for the backward pass (models/llama.py's
    REMAT_POLICIES): the layer input always; `minimal` adds its named projection outputs and residual
    (and the LoRA hidden states), `dots` every matmul output. `tokens` per device sizes an MoE's routed rows."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    i = mlp_width(cfg, tokens)
    lora = method.adapter_width
    minimal = d + (q + 2 * kv) + d + d + 2 * i + lora  # input, q/k/v, attn_context, resid_mid, gate, up
    return {"full": d, "minimal": minimal, "dots": minimal + 2 * d}  # dots: + o_proj and down outputs


def replicated_widths(method: Method, cfg: ModelConfig) -> dict[str, float]:
    """Of `saved_widths`, the values the tensor axis does not split: the residual stream (act_embed) and the LoRA
    hidden states; q/k/v, the attention context, gate and up are split over tensor."""
    d = cfg.hidden_size
    lora = method.adapter_width
    return {"full": d, "minimal": 2 * d + lora, "dots": 4 * d + lora}  # input, resid_mid (+ o_proj, down outputs)


def layer_bytes(cfg: ModelConfig, t: int, *, rows: int, itemsize: int, attention: str, platform: str, tensor: int,
                shards: int) -> float:
    """What one decoder layer keeps for its backward pass, `rows` rows of `t` tokens on a device (no remat):
    Korthikanti's count, or TPU_LAYER on TPU; an MoE layer's routed MLP over the global batch's tokens (the batch
    split `shards` ways)."""
    d = cfg.hidden_size
    scale = itemsize / 2
    scores = 5 * cfg.num_heads * t / d if attention == "xla" else 0  # flash kernels keep no [T, S]
    if cfg.moe is None and platform == "tpu":
        replicated, split = TPU_LAYER
        return t * rows * itemsize * (replicated * d + (split * cfg.intermediate_size + scores * d / 2) / tensor)
    if cfg.moe is None:  # Korthikanti's tensor-parallel form: 10 of the 34 are not split
        return t * rows * d * (10 + (24 + scores) / tensor) * scale
    # attention and norms (34 - the dense MLP's 19), then the routed MLP: its forward buffers span the global batch
    # (the sort by expert runs over every token, so XLA gathers them on each device)
    gathered = moe_layer_bytes(cfg, t * rows * shards, itemsize)
    return (t * rows * d * (15 + scores) * scale + gathered) / tensor


def forward_bytes(cfg: ModelConfig, t: int, *, loss_chunk: int, **per_device) -> int:
    """Activations of a forward-only pass (no gradient, so nothing kept for a backward; a distillation teacher's),
    rows of `t` tokens: one layer's intermediates at a time (at most what `layer_bytes` says it keeps for a backward,
    same `per_device` figures), the last hidden states the loss reads (whole on every tensor shard) and one fp32
    logits chunk."""
    rows, itemsize, tensor = per_device["rows"], per_device["itemsize"], per_device["tensor"]
    logits = rows * min(loss_chunk, t) * cfg.vocab_size * 4 / tensor
    return int(layer_bytes(cfg, t, **per_device) + rows * t * cfg.hidden_size * itemsize + logits)


def estimate(run: Run, model_cfg: ModelConfig, mesh: Mesh | None = None) -> dict[str, int]:
    """Bytes per device of the composed `run` (its `auto` values resolved for its devices' platform) over `mesh`
    (default: the run's own): the trainable + frozen params, optimizer state and activations, then what the
    objective adds (`Objective.memory`)."""
    mesh = run.mesh if mesh is None else mesh
    platform = platform_of(mesh)
    m, s, method = run.model, run.schedule, run.method
    model_cfg = model_cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    model_cfg = on_platform(model_cfg, platform)
    quant = m.quant
    _, trainable, quantized, frozen = nnx.split(abstract_model(method, m, model_cfg), method.trainable,
                                                QuantizedParam, ...)
    opt = jax.eval_shape(make_optimizer(run.optim, s.steps).tx.init, trainable)
    rules = run.rules
    rows = s.batch_size // s.grad_accum // batch_shards(mesh, rules)
    t, d, cfg = s.seq_len, model_cfg.hidden_size, model_cfg
    itemsize = jnp.dtype(m.dtype).itemsize
    scale = itemsize / 2
    tensor = mesh.shape["tensor"]
    per_device = dict(rows=rows, itemsize=itemsize, attention=m.attention, platform=platform, tensor=tensor,
                      shards=batch_shards(mesh, rules))
    per_layer = layer_bytes(cfg, t, **per_device)
    saved = saved_widths(method, cfg, t * rows).get(m.remat)
    if saved is None:  # remat=none: every intermediate of every layer lives until the backward pass
        acts = cfg.num_layers * per_layer
    else:  # the saved tensors of every layer (the residual stream whole on each tensor shard), plus one layer's
        # worth during its recomputation
        replicated = replicated_widths(method, cfg)[m.remat]
        acts = cfg.num_layers * t * rows * (replicated + (saved - replicated) / tensor) * itemsize + per_layer
    acts += rows * min(s.loss_chunk, t) * cfg.vocab_size * 4 * 3 / tensor  # logits chunk, fp32, fwd+bwd
    if platform == "tpu":  # the output head in fp32 for the loss; under fsdp, the embedding and head gathered
        heads = 1 if cfg.tie_word_embeddings else 2
        gathered = heads * itemsize if mesh.shape["fsdp"] > 1 else 0
        acts += cfg.vocab_size * d * (4 + gathered) / tensor
    if cfg.moe is not None:  # every layer's router logits, fp32, returned for the balance loss; and during one
        # layer's backward the gradients of its routed buffers, as large as the buffers
        acts += cfg.num_layers * t * rows * cfg.moe.num_experts * 4
        acts += moe_layer_bytes(cfg, t * rows, itemsize) / tensor
    if run.forget.kl_weight:
        acts *= 2  # the retain batch: tuned forward + backward, base forward (its logits chunk included)
    if quant is not None:  # one layer's quantized kernels dequantized (fp32, then a compute-dtype copy)
        dense = _device_bytes(_dense_of(quantized), mesh, rules, "float32") / cfg.num_layers
        acts += dense * (scale / 2 if platform == "tpu" else 1 + scale / 2)  # TPU: no fp32 copy (XLA fuses
        # the dequantization into its consumer: the 8B and 70B QLoRA recipes' TPU compiles, memory_vs_xla.py)
    out = {"trainable": _device_bytes(trainable, mesh, rules),
           "frozen": _device_bytes(frozen, mesh, rules, m.frozen_dtype) + _device_bytes(quantized, mesh, rules),
           "opt_state": _device_bytes(opt, mesh, rules), "activations": int(acts)}
    if method.keeps_start_copy and (run.forget.kl_weight or run.forget.l2_weight):
        out["start_copy"] = out["trainable"]  # W_base: the step-0 weights, same shapes and shardings

    def forward(model: ModelConfig, length: int) -> int:
        return forward_bytes(on_platform(model, platform), length, loss_chunk=s.loss_chunk, **per_device)

    # generate.unrolled_decode: a one-device CPU folds the layer weights once per generation call
    folded = layer_weights(cfg) * itemsize if platform == "cpu" and mesh.size == 1 else 0
    shapes = MemoryShapes(cfg, rows, t, itemsize, out["trainable"], out["frozen"], out["activations"], forward,
                          int(folded))
    reference = run.objective.reference(start_copy_is_free=not method.keeps_start_copy)
    return {**out, **run.objective.memory(shapes, reference)}


def layer_weights(cfg: ModelConfig) -> int:
    """Weights of the decoder layers' linears, every expert of a mixture-of-experts layer included: what
    generation's unrolled token loop folds dense once per call (`Llama.layer_slices`)."""
    d, moe = cfg.hidden_size, cfg.moe
    if moe is None:
        mlp = 3 * d * cfg.intermediate_size
    else:  # the router and every expert
        mlp = d * moe.num_experts + moe.num_experts * 3 * d * moe.intermediate_size
    return cfg.num_layers * (attention_params(cfg) + mlp)


def abstract_model(method: Method, model: ModelPart, model_cfg: ModelConfig) -> nnx.Module:
    """The model a run trains, from shapes alone: the method's adapters attached, the frozen kernels quantized as
    `model` (the run's model part) holds them."""

    def build():
        return method.attach(Llama(model_cfg, rngs=nnx.Rngs(0)), 0)

    abstract = nnx.eval_shape(build)
    if model.quant is not None:
        _abstract_quantized(abstract, model.quant, model.path)
    return abstract


def _abstract_quantized(model: nnx.Module, quant, path: str) -> None:
    """Swap the selected abstract kernels for abstract quantized ones (a GGUF base: each in the ggml type the
    file stores its first layer in)."""
    header = read_gguf_header(resolve(path)[1]) if quant.scheme == "gguf" else None
    for name, linear in frozen_quant_kernels(model, quant.targets):
        var = linear.kernel
        scheme = quant.scheme
        if header is not None:
            scheme = qtype_name(header.tensors[gguf_tensor_name(hf_tensor_name(tuple(name.split(".")) + ("kernel",), 0)[0])])
        weight = abstract_weight(scheme, var.get_value().shape, var.get_metadata()["logical_axes"], quant.dtype)
        linear.kernel = QuantizedParam(weight, **var.get_metadata())


def _dense_of(quantized: nnx.State) -> nnx.State:
    """The full-precision kernels quantized ones stand for (shapes only)."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda v: nnx.Param(jax.ShapeDtypeStruct(v.get_value().shape, jnp.float32),
                                            **v.get_metadata()), quantized, is_leaf=is_var)


def frozen_bytes(frozen, dtype) -> tuple[int, int]:
    """(bytes a frozen state holds, bytes it would hold unquantized in `dtype`): what a quantized base saves."""
    quantized = lambda x: hasattr(x, "dequantize")  # noqa: E731
    held = full = 0
    for leaf in jax.tree.leaves(frozen, is_leaf=quantized):
        held += int(leaf.nbytes)
        full += int(np.prod(leaf.shape)) * jnp.dtype(dtype).itemsize if quantized(leaf) else int(leaf.nbytes)
    return held, full


def check_fits(run: Run, model_cfg: ModelConfig, mesh: Mesh | None = None) -> str:
    """One line describing the estimate; ConfigError when it exceeds the device's memory."""
    mesh = run.mesh if mesh is None else mesh
    parts = estimate(run, model_cfg, mesh)
    total = sum(parts.values())
    capacity, source = device_capacity(mesh)
    line = ("memory per device (estimate): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
            + f"; total {total / GIB:.2f} GiB of {capacity / GIB:.1f} GiB ({source})")
    if total > 0.95 * capacity:
        raise ConfigError(f"{line}: does not fit; use model.remat=full, a larger mesh.fsdp, "
                          "train.grad_accum or a smaller train.batch_size")
    return line


def recipe_estimate(path: str | os.PathLike, devices: int, backend: str = "gpu") -> dict[str, float]:
    """GiB per device of a recipe run on `devices` devices of `backend` (its `auto` keys resolved for that
    backend), the model's shape from the recipe's HF_CONFIG: the figure a recipe's docstring quotes, from
    shapes alone (no weights, no accelerator; the host needs `devices` JAX devices, e.g. XLA_FLAGS=
    --xla_force_host_platform_device_count=8)."""
    module = recipe_module(path)
    run = compose(module.get_config(), jax.devices()[:devices], platform=backend)
    parts = estimate(run, on_platform(config_from_hf(module.HF_CONFIG), backend))
    return {**{k: round(v / GIB, 2) for k, v in parts.items()}, "total": round(sum(parts.values()) / GIB, 2)}
