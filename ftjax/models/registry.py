"""HF model_type -> ModelConfig mapping and the ftjax-param <-> HF-tensor name map."""

from __future__ import annotations

import math
from typing import Any

from ftjax.errors import LoadError
from ftjax.models.gemma import GEMMA, gemma_from_hf
from ftjax.models.layers import RopeConfig
from ftjax.models.llama import Llama, ModelConfig
from ftjax.models.moe import moe_from_hf
from ftjax.models.phi import phi_from_hf

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma2", "gemma3_text",
                         "phi3")
# transformers' Gemma2Config / Gemma3TextConfig defaults for the keys a config.json may leave out (the Hub's
# multimodal Gemma 3 folders, 4B/12B/27B, name only what differs in text_config)
_GEMMA = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
              num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
              tie_word_embeddings=True)
FAMILY_DEFAULTS = {
    "gemma2": dict(_GEMMA, vocab_size=256_000, max_position_embeddings=8192, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(_GEMMA, vocab_size=262_208, max_position_embeddings=131_072),
}
REFUSED = {  # families near a supported one, refused by name
    "phi3small": "Phi-3-small (model_type phi3small: block-sparse attention, gegelu MLP) is not supported",
    "phimoe": "Phi-3.5-MoE (model_type phimoe) is not supported",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
MODEL_CLASSES = {t: Llama for t in SUPPORTED_MODEL_TYPES}


def _rope(hf: dict, layer_type: str | None = None) -> RopeConfig:
    """Both config.json forms: classic `rope_theta` + `rope_scaling`, and transformers 5 `rope_parameters`
    (Gemma 3's holds one dict per layer type: `layer_type` picks it)."""
    params = dict(hf.get("rope_parameters") or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise LoadError(f"rope type '{kind}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "longrope":  # transformers' defaults: factor from the two lengths, attention factor from it
        original = int(merged.get("original_max_position_embeddings", hf.get("original_max_position_embeddings")))
        factor = float(merged.get("factor") or hf.get("max_position_embeddings", original) / original)
        attention = merged.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeConfig(theta=float(theta), kind=kind, factor=factor, original_max_position_embeddings=original,
                          short_factor=tuple(map(float, merged["short_factor"])),
                          long_factor=tuple(map(float, merged["long_factor"])), attention_factor=float(attention))
    return RopeConfig(
        theta=float(theta), kind=kind, factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)))


def _sliding(hf: dict, model_type: str, num_layers: int) -> tuple[int | None, tuple]:
    """Sliding-window size and which layers use it, as transformers decides per family."""
    window = hf.get("sliding_window", 4096 if model_type in ("mistral", "qwen2", "qwen3") else None)
    if model_type in ("mistral", "mixtral", "phi3"):
        return (int(window) if window else None), ()
    if model_type == "qwen3_moe":  # one window for every layer, when enabled
        return (int(window) if window and hf.get("use_sliding_window", False) else None), ()
    if model_type in GEMMA:  # Gemma 2 alternates 1:1, Gemma 3 5:1 (sliding_window_pattern), global last
        types = hf.get("layer_types")
        if types is None:
            pattern = int(hf.get("sliding_window_pattern", 2 if model_type == "gemma2" else 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        flags = tuple(t == "sliding_attention" for t in types)
        return (int(window), flags) if any(flags) and window else (None, ())
    if model_type in ("qwen2", "qwen3"):
        types = hf.get("layer_types")
        if types is None:
            if not hf.get("use_sliding_window", False) or not window:
                return None, ()
            first = int(hf.get("max_window_layers", 28))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        flags = tuple(t == "sliding_attention" for t in types)
        return (int(window), flags) if any(flags) and window else (None, ())
    return None, ()


def text_config(hf: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The language model's config of a multimodal Gemma 3 folder (Gemma3ForConditionalGeneration), and
    whether it was one; other configs pass through."""
    if hf.get("model_type") == "gemma3" and isinstance(hf.get("text_config"), dict):
        text = dict(hf["text_config"])
        text["model_type"] = "gemma3_text"
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "tie_word_embeddings"):
            if key in hf and key not in text:
                text[key] = hf[key]
        return text, True
    return hf, False


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
                   source: str = "config.json") -> ModelConfig:
    """Map an HF config.json dict onto ModelConfig; unknown families fail with the supported list."""
    hf = text_config(hf)[0]
    model_type = hf.get("model_type")
    hf = {**FAMILY_DEFAULTS.get(model_type, {}), **hf}
    if model_type in REFUSED:
        raise LoadError(f"{source}: {REFUSED[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LoadError(f"{source}: model_type '{model_type}' is not supported "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        window, sliding_layers = _sliding(hf, model_type, layers)
        bias = bool(hf.get("attention_bias", False))
        head_dim = int(hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads))
        family = dict(qk_norm=model_type in ("qwen3", "qwen3_moe"), rope=_rope(hf))
        if model_type in GEMMA:
            family.update(gemma_from_hf(hf, model_type, head_dim, source, _rope))
        elif model_type == "phi3":
            family.update(phi_from_hf(hf, head_dim))
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
            num_layers=layers, num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim, moe=moe_from_hf(hf, model_type, source),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in GEMMA)),
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window, sliding_layers=sliding_layers, model_type=model_type,
            dtype=dtype, param_dtype=param_dtype or dtype, **family,
            extra=tuple(sorted((k, str(v)) for k, v in hf.items() if k in ("bos_token_id", "eos_token_id",
                                                                             "pad_token_id", "torch_dtype"))))
    except KeyError as e:
        raise LoadError(f"{source}: missing required key {e.args[0]!r}") from None


def hf_tensor_name(path: tuple[str, ...], layer: int | None = None) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for an ftjax parameter path; `layer` for stacked params."""
    *modules, leaf = path
    if tuple(path) == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    if modules[-1:] == ["mlp"] and leaf == "router":  # [D, E] <- HF's [E, D] gate
        return f"model.layers.{layer}.mlp.gate.weight", True
    if modules[-2:] == ["mlp", "experts"]:  # all experts at once, [E, in, out]: see interop/expert_layouts.py
        return f"model.layers.{layer}.mlp.experts.*.{leaf}", False
    hf_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    if modules[0] == "layers":
        prefix = f"model.layers.{layer}." + ".".join(modules[1:])
    elif modules[0] == "lm_head":
        prefix = "lm_head"
    else:
        prefix = "model." + ".".join(modules)
    return f"{prefix}.{hf_leaf}", leaf == "kernel"


def is_stacked(path: tuple[str, ...]) -> bool:
    """Params under `layers` carry a leading layer axis."""
    return path[0] == "layers"
