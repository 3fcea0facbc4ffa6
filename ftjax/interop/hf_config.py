"""The HF config.json of a model being exported: the source's own dict where there is one, else built from
ModelConfig (the inverse of `ftjax.models.registry.config_from_hf`, for models without an HF source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftjax.models.gemma import gemma_to_hf
from ftjax.models.llama import ModelConfig
from ftjax.models.moe import moe_to_hf
from ftjax.models.phi import phi_to_hf

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _extra_value(s: str) -> Any:
    """ModelConfig.extra keeps HF items as strings (it must stay hashable): '2' -> 2, '[2, 3]' -> [2, 3]."""
    try:
        return json.loads(s)
    except ValueError:
        return s


def config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """An HF config dict that `config_from_hf` maps back onto `cfg` (architecture fields)."""
    d: dict[str, Any] = {
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope.theta,
    }
    rope = cfg.rope
    if rope.kind == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.kind == "llama3":
        d["rope_scaling"] = {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                             "high_freq_factor": rope.high_freq_factor,
                             "original_max_position_embeddings": rope.original_max_position_embeddings}
    elif rope.kind == "longrope":
        d["original_max_position_embeddings"] = rope.original_max_position_embeddings
        d["rope_scaling"] = {"rope_type": "longrope", "factor": rope.factor, "attention_factor": rope.attention_factor,
                             "short_factor": list(rope.short_factor), "long_factor": list(rope.long_factor)}
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    elif cfg.model_type == "qwen3":
        d["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    elif cfg.model_type in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        d["use_sliding_window"] = window is not None
        d["sliding_window"] = window
        if window is not None:
            flags = cfg.sliding_layers or (True,) * cfg.num_layers
            d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
    if cfg.gemma is not None:
        d.update(gemma_to_hf(cfg))
    if cfg.phi is not None:
        d.update(phi_to_hf(cfg))
    d.update(moe_to_hf(cfg))
    for k, v in cfg.extra:
        if k in TOKEN_IDS:
            d[k] = _extra_value(v)
    return d


def export_config(cfg: ModelConfig, source: dict[str, Any] | None, dtype: str, tokenizer=None) -> dict[str, Any]:
    """config.json for the export: the source's dict (all its keys kept) or one built from `cfg`, with
    the export dtype, the architecture class and token ids (from the tokenizer when the source has none)."""
    out = dict(source) if source and "text_config" not in source else config_from_model(cfg)  # multimodal: text
    out.pop("auto_map", None)  # never point loaders at remote code
    out.pop("quantization_config", None)  # exported weights are dense
    out["model_type"] = cfg.model_type
    out["architectures"] = [ARCHITECTURES[cfg.model_type]]
    out["tie_word_embeddings"] = cfg.tie_word_embeddings
    out["dtype"] = dtype  # transformers 5 reads `dtype`; 4.x and vLLM read `torch_dtype`
    out["torch_dtype"] = dtype
    if tokenizer is not None:
        for key in TOKEN_IDS:
            tid = getattr(tokenizer, key, None)
            if out.get(key) is None and tid is not None:
                out[key] = int(tid)
    return out


def generation_config(hf_config: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """generation_config.json: the source's own (sampling defaults kept), else the HF config's token ids."""
    if source:
        return dict(source)
    return {k: hf_config[k] for k in TOKEN_IDS if hf_config.get(k) is not None}


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
