"""ftjax model -> HF folder (config.json, safetensors shards, tokenizer, generation_config.json).

LoRA adapters are folded in tensor by tensor (W + scale·A·B in fp32; a mixture-of-experts model's per-expert
adapters expert by expert), and every tensor is cut, cast and transposed on the devices and fetched alone, so
neither a merged copy of the model nor the whole model on one device ever exists. Multi-host: every process
takes part in each gather, process 0 writes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ftjax.dtypes import dtype_name
from ftjax.errors import ConfigError, LoadError
from ftjax.interop import gather
from ftjax.interop.expert_layouts import hub_expert_name, hub_router_name
from ftjax.interop.hf_config import export_config, generation_config
from ftjax.interop.safetensors_writer import TensorPlan, parse_size, plan_shards, write_safetensors
from ftjax.interop.sources import hf_configs, pretrained_tokenizer
from ftjax.models.layers import Linear
from ftjax.models.moe import Experts
from ftjax.models.registry import hf_tensor_name, is_stacked

INDEX = "model.safetensors.index.json"


def base_tokenizer(source: str | Path) -> Any:
    """The base's tokenizer, or None for a weights-only HF folder (the export is then weights-only too)."""
    try:
        return pretrained_tokenizer(source)
    except LoadError as e:
        if "no tokenizer.json" not in str(e):
            raise
        return None


def _adapters(model: nnx.Module) -> dict[tuple, Any]:
    """kernel path -> the LoRA module attached to that linear."""
    return {tuple(path) + ("kernel",): node.lora for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and node.lora is not None}


def _expert_adapters(model: nnx.Module) -> dict[tuple, tuple[tuple, Any, tuple[int, int] | None]]:
    """expert weight path -> (its adapter's path, the adapter, the columns of the adapter's output it takes):
    gate|up's adapter is split between gate_proj (first half) and up_proj (second half), as `merge_lora` does."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Experts):
            continue
        f = node.gate_proj.get_value().shape[-1]
        gate_up, down = Experts.ADAPTED["gate_up_proj"], Experts.ADAPTED["down_proj"]
        for name, attr, columns in (("gate_proj", gate_up, (0, f)), ("up_proj", gate_up, (f, 2 * f)),
                                    ("down_proj", down, None)):
            if getattr(node, attr) is not None:
                out[tuple(path) + (name,)] = (tuple(path) + (attr,), getattr(node, attr), columns)
    return out


def _unmerged_lora(model: nnx.Module, adapters: dict[tuple, Any], expert_adapters: dict[tuple, tuple]) -> list[str]:
    """LoRA params that no adapted Linear or experts weight holds (so this export would drop them): their paths."""
    held = {k[:-1] + ("lora",) for k in adapters} | {held for held, _, _ in expert_adapters.values()}
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
            if tuple(p[:-1]) not in held]


def _expert_fetch(value: jax.Array, layer: int, dtype: str, expert: int, adapter: tuple | None):
    """Fetches expert `expert`'s [out, in] tensor of one layer, its adapter's update folded in when it has one."""
    if adapter is None:
        return functools.partial(gather.tensor, value, layer, dtype, True, expert)
    _, lora, columns = adapter
    return functools.partial(gather.merged_tensor, value, lora.lora_a[...], lora.lora_b[...], lora.scale, layer,
                             dtype, True, expert, columns)


def _expert_plans(model_type: str, path: tuple, value: jax.Array, layer: int, dtype: str,
                  adapter: tuple | None) -> list[TensorPlan]:
    """One layer's stacked experts [E, in, out] as the Hub's per-expert [out, in] tensors (what transformers 5
    writes by default, reads through its conversion mapping, and what vLLM and transformers 4 read), each
    expert's adapter (if any) folded in on its own."""
    num_experts, in_dim, out_dim = value.shape[1:]
    return [TensorPlan(hub_expert_name(model_type, layer, path[-1], e), (out_dim, in_dim), np.dtype(dtype),
                       _expert_fetch(value, layer, dtype, e, adapter)) for e in range(num_experts)]


def _plan(path: tuple, value: jax.Array, lora: Any, layer: int | None, dtype: str,
          model_type: str = "") -> TensorPlan:
    name, transpose = hf_tensor_name(path, layer)
    if path[-1] == "router":
        name = hub_router_name(model_type, layer)
    shape = tuple(value.shape[1:] if layer is not None else value.shape)
    shape = shape[::-1] if transpose else shape
    if lora is None:
        fetch = functools.partial(gather.tensor, value, layer, dtype, transpose)
    else:
        fetch = functools.partial(gather.merged_tensor, value, lora.lora_a[...], lora.lora_b[...], lora.scale,
                                  layer, dtype, transpose)
    return TensorPlan(name, shape, np.dtype(dtype), fetch)


def hf_tensor_plans(model: nnx.Module, dtype: str) -> list[TensorPlan]:
    """Every HF tensor of the (merged) model in HF order: embeddings, layer by layer, final norm, head.

    Tied embeddings have no lm_head param, hence no lm_head.weight.
    """
    params = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    adapters, expert_adapters = _adapters(model), _expert_adapters(model)
    unmerged = _unmerged_lora(model, adapters, expert_adapters)
    if unmerged:
        raise ConfigError(f"HF export: LoRA params that adapt neither a Linear nor an expert weight cannot be merged "
                          f"(e.g. {unmerged[0]})")
    stacked = [(tuple(p), v) for p, v in params if is_stacked(tuple(p))]
    single = [(tuple(p), v) for p, v in params if not is_stacked(tuple(p))]
    order = lambda pv: (pv[0] != ("embed_tokens",), pv[0][0] == "lm_head")  # noqa: E731
    single.sort(key=order)
    plans = [_plan(p, v.get_value(), adapters.get(p), None, dtype) for p, v in single if p == ("embed_tokens",)]
    n_layers = model.config.num_layers
    model_type = model.config.model_type
    for i in range(n_layers):
        for p, v in stacked:
            if p[-2:-1] == ("experts",):
                plans += _expert_plans(model_type, p, v.get_value(), i, dtype, expert_adapters.get(p))
            else:
                plans.append(_plan(p, v.get_value(), adapters.get(p), i, dtype, model_type))
    plans += [_plan(p, v.get_value(), adapters.get(p), None, dtype) for p, v in single if p != ("embed_tokens",)]
    return plans


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _clear_old_weights(out: Path) -> None:
    """Shards of an earlier export into the same folder would be picked up with the new ones."""
    for f in list(out.glob("model*.safetensors")) + [out / INDEX]:
        if f.exists():
            f.unlink()


def export_hf(model: nnx.Module, out: str | Path, *, source: str | Path | None = None, tokenizer: Any = None,
              dtype: Any = None, max_shard_size: str | int = "5GB") -> Path:
    """Write `model` (LoRA merged) as an HF folder that transformers and vLLM load.

    `source` is the base model's path or name (a workdir's is its `config.model.path`): its config.json (or GGUF-derived config), generation
    config and, unless `tokenizer` is given, its tokenizer are carried over. `dtype` defaults to the
    dtype the weights are held in (fp32 stays fp32; a run with bf16 frozen weights exports bf16).
    """
    cfg = model.config
    dtype = dtype_name(dtype if dtype is not None else model.embed_tokens[...].dtype)
    out = Path(out)
    main = jax.process_index() == 0
    src_config, src_generation = hf_configs(source) if source is not None else (None, None)
    if tokenizer is None and source is not None:
        tokenizer = base_tokenizer(source)
    shards = plan_shards(hf_tensor_plans(model, dtype), parse_size(max_shard_size))
    names = _shard_names(len(shards))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _clear_old_weights(out)
    for fname, shard in zip(names, shards):
        write_safetensors(out / fname, shard, write=main)
    if main:
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                     "weight_map": {t.name: fname for fname, s in zip(names, shards) for t in s}}
            (out / INDEX).write_text(json.dumps(index, indent=2))
        config = export_config(cfg, src_config, dtype, tokenizer)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (out / "generation_config.json").write_text(json.dumps(generation_config(config, src_generation), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    gather.barrier("ftjax_export_hf")
    return out
