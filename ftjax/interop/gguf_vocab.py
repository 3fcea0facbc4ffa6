"""A byte-level BPE tokenizer (tokenizer.json) -> llama.cpp's `tokenizer.ggml.*` metadata.

What convert_hf_to_gguf writes for gpt2-style vocabularies: the tokens by id (ids the tokenizer
lacks become `[PADi]`, unused), their types (added special tokens are control, other added tokens
user-defined), the merges, the special token ids and the chat template. llama.cpp picks its
pre-tokenizer by name, so the name is read off tokenizer.json's pre-tokenizer; only the splits
ftjax's own GGUF reader knows are accepted, anything else is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ftjax.errors import ConfigError
from ftjax.interop.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4  # llama.cpp token types (gguf.TokenType)
_SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class GGUFVocab:
    """Everything llama.cpp needs to rebuild the tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unknown / padding -> id
    add_bos: bool
    add_eos: bool
    chat_template: Any  # a string, a {name: template} dict, or None


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer, or None if it has none."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The `tokenizer.ggml.*` content of a transformers fast tokenizer for a model with `vocab_size` rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError(f"GGUF export: only byte-level BPE (gpt2-style) tokenizers are converted; this one is "
                          f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder")
    pre = _pre_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise ConfigError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} "
                          f"matches none llama.cpp knows here (gpt2, smollm, llama-bpe, qwen2)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has id {max(by_id)}, the model only {vocab_size} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = {}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        if getattr(tokenizer, attr, None) is not None:
            special_ids[key] = int(getattr(tokenizer, attr))
    return GGUFVocab(pre, tokens, types, merges, special_ids, bool(getattr(tokenizer, "add_bos_token", False)),
                     bool(getattr(tokenizer, "add_eos_token", False)), getattr(tokenizer, "chat_template", None))


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the vocabulary to a gguf.GGUFWriter, as convert_hf_to_gguf's gpt2 path does."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for key, token_id in vocab.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    template = vocab.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)
