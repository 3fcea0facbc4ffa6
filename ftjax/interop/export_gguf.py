"""ftjax model -> one GGUF file for llama.cpp / Ollama (LoRA merged), written with the `gguf` package.

The tensors are the merged HF tensors of `export_hf` (fetched one at a time, never the whole
model on one host), renamed to llama.cpp's names, q/k rows of `llama` tensors permuted as
convert_hf_to_gguf does, and quantized with `gguf.quants.quantize`; 1-D tensors (norms, biases)
stay f32, as llama.cpp keeps them. Metadata: the architecture from the model config; the
`general.*` and `tokenizer.*` keys copied from a GGUF source, else converted from tokenizer.json.
Multi-host: every process takes part in each fetch, process 0 writes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ftjax.errors import ConfigError
from ftjax.interop import gather, sources
from ftjax.interop.export_hf import base_tokenizer, hf_tensor_plans
from ftjax.interop.gguf import gguf_tensor_name, permute_rows
from ftjax.interop.gguf_vocab import gguf_vocab, write_vocab

# --quant -> (ggml type of 2-D tensors, llama.cpp file type); what gguf.quants.quantize can write
QUANTS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
          "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}
# ftjax model_type -> llama.cpp architecture (convert_hf_to_gguf writes Mistral as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_COPIED_PREFIXES = ("general.", "tokenizer.")
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def check_quant(quant: str) -> str:
    """The ggml type name for --quant; K-quants and unknown names fail in one line."""
    q = quant.lower()
    if q in QUANTS:
        return q
    if "_k" in q or q.startswith(("iq", "tq")):
        raise ConfigError(f"--quant={quant}: K-/I-quants are not written here; export --quant=f16 (or f32) and "
                          f"run llama.cpp's `llama-quantize model-f16.gguf model-{q}.gguf {quant.upper()}`")
    raise ConfigError(f"--quant={quant} is not a GGUF type this export writes (choose: {', '.join(QUANTS)})")


def check_architecture(cfg: Any) -> str:
    """llama.cpp's name for the model's family; features it would silently compute differently are refused."""
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise ConfigError(f"GGUF export: llama.cpp has no architecture for model_type '{cfg.model_type}' "
                          f"(exportable: {', '.join(ARCHITECTURES)})")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise ConfigError(f"GGUF export: llama.cpp's {arch} has no sliding-window attention "
                          f"(this model attends over {cfg.sliding_window} tokens)")
    if cfg.rope.kind not in ("default", "linear"):
        raise ConfigError(f"GGUF export: rope type '{cfg.rope.kind}' is not written (llama.cpp needs a "
                          f"rope_freqs tensor for it); supported: default, linear")
    if cfg.mlp_bias:
        raise ConfigError("GGUF export: MLP biases are not written (ftjax's GGUF reader has no names for them)")
    return arch


def _architecture_metadata(writer: Any, cfg: Any, arch: str) -> None:
    """`{arch}.*` keys as convert_hf_to_gguf writes them."""
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.rope.kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope.factor)


def _copy_metadata(writer: Any, source_gguf: Path) -> None:
    """The source GGUF's own general.* and tokenizer.* keys, value types kept (llama.cpp checks them)."""
    import gguf

    reader = gguf.GGUFReader(source_gguf)
    for name, field in reader.fields.items():
        if not name.startswith(_COPIED_PREFIXES) or name in _NOT_COPIED:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def _converted_vocab(cfg: Any, source: str | Path | None, tokenizer: Any) -> Any:
    """The tokenizer of a source that is not a GGUF as llama.cpp's vocabulary (refusals raise here)."""
    if tokenizer is None:
        raise ConfigError(f"GGUF export needs the vocabulary: the base ({source}) has no tokenizer.json and no "
                          f"tokenizer was given")
    return gguf_vocab(tokenizer, cfg.vocab_size)


def _gguf_plans(model: nnx.Module, arch: str) -> list[tuple[str, Any]]:
    """(llama.cpp name, TensorPlan) for every merged tensor, with the q/k row permutation where llama needs it."""
    cfg = model.config
    out = []
    for plan in hf_tensor_plans(model, "float32"):
        name = gguf_tensor_name(plan.name)
        if name is None:
            raise ConfigError(f"GGUF export: tensor {plan.name} has no llama.cpp name")
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads is not None:
            plan = dataclasses.replace(plan, fetch=functools.partial(_permuted, plan.fetch, heads))
        out.append((name, plan))
    return out


def _permuted(fetch: Any, heads: int) -> np.ndarray:
    return permute_rows(fetch(), heads)


def _ggml_type(shape: tuple[int, ...], quant: str):
    """1-D tensors stay F32; a row not made of whole blocks falls back to F16 (as convert_hf_to_gguf does)."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def encode_tensor(w: np.ndarray, qtype) -> np.ndarray:
    """A float32 tensor as the bytes GGUF stores for `qtype` (float arrays for F32/F16)."""
    import gguf
    from gguf.quants import quantize

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(w, np.float16)
    return quantize(np.ascontiguousarray(w, np.float32), qtype)


def export_gguf(model: nnx.Module, out: str | Path, *, source: str | Path | None = None, tokenizer: Any = None,
                quant: str = "f16") -> Path:
    """Write `model` (LoRA merged) as the GGUF file `out` for llama.cpp, 2-D tensors in `quant`.

    `source` is the base model's path or name: a GGUF source gives its general.* and tokenizer.*
    metadata; otherwise the tokenizer (`tokenizer`, else the source's) is converted.
    """
    import gguf

    quant, cfg = check_quant(quant), model.config
    arch = check_architecture(cfg)
    out = Path(out)
    kind, source_path = sources.resolve(source) if source is not None else (None, None)
    vocab = None
    if kind != "gguf":  # converted (or refused) on every process, before any collective fetch
        if tokenizer is None and source is not None:
            tokenizer = base_tokenizer(source)
        vocab = _converted_vocab(cfg, source, tokenizer)
    plans = _gguf_plans(model, arch)
    main = jax.process_index() == 0
    partial = out.with_name(out.name + ".partial")  # renamed once complete: a file is whole or absent
    writer = gguf.GGUFWriter(partial, arch) if main else None
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        if vocab is None:
            _copy_metadata(writer, source_path)
        else:
            writer.add_type("model")
            writer.add_name(Path(str(source)).name if source is not None else "ftjax export")
            write_vocab(writer, vocab)
        _architecture_metadata(writer, cfg, arch)
        writer.add_file_type(int(gguf.LlamaFileType[QUANTS[quant][1]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, plan in plans:
            qtype = _ggml_type(tuple(plan.shape), quant)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(plan.shape))
            writer.add_tensor_info(name, tuple(plan.shape), np.dtype(np.float32), n // block * size, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    for name, plan in plans:
        w = plan.fetch()  # every process: a collective fetch of one tensor
        if main:
            writer.write_tensor_data(encode_tensor(w, _ggml_type(w.shape, quant)))
    if main:
        writer.close()
        partial.replace(out)
    gather.barrier("ftjax_export_gguf")
    return out

