"""A transformers fast tokenizer (with chat template) rebuilt from a GGUF file's metadata, without torch.

transformers' own GGUF tokenizer path imports torch, so the byte-level BPE is assembled here
with the `tokenizers` library. The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`
table, which matters: SmolLM2 ("smollm") splits every digit off before the GPT-2 regex.
"""

from __future__ import annotations

from pathlib import Path

from ftjax.errors import LoadError
from ftjax.interop.gguf import read_gguf_header

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# The pre-tokenizer regexes of llama.cpp's llama3 and qwen2 groups (the GGUF export names a tokenizer.json's
# Split pattern by them).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how the text is split before BPE (llama.cpp llama-vocab.cpp groups)
_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_PRE_GPT2 = ("gpt-2", "gpt2", "olmo", "mpt")
_PRE_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
               "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}
SUPPORTED_PRE_TOKENIZERS = _PRE_DIGITS_THEN_GPT2 + _PRE_GPT2 + tuple(_PRE_SPLITS)


def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise LoadError(f"{path}: pre-tokenizer '{pre}' is not supported "
                    f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE tokens are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def gguf_tokenizer(path: str | Path):
    """The model's `PreTrainedTokenizerFast` from GGUF metadata: BPE, special tokens, chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    header = read_gguf_header(path)
    md, path = header.metadata, header.path
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LoadError(f"{path}: tokenizer model '{kind}' is not supported (supported: gpt2 byte-level BPE)")
    tokens: list[str] = md.get("tokenizer.ggml.tokens") or []
    merges: list[str] = md.get("tokenizer.ggml.merges") or []
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not merges or len(types) != len(tokens):
        raise LoadError(f"{path}: tokenizer metadata is incomplete (tokens, merges and token types are needed)")

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= spelled:  # a token stored as raw text: respell it in the byte alphabet
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab[tok] = i  # a repeated spelling maps to its last id, as in llama.cpp
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise LoadError(f"{path}: malformed BPE merge {m!r}")
        pairs.append((a, b))

    backend = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(md.get("tokenizer.ggml.pre"), path)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens (<|im_start|>) are matched whole and are special; user-defined ones are whole, not special
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= spelled])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    kwargs = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = md.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise LoadError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary")
            kwargs[name] = tokens[token_id]
    templates = {k.removeprefix("tokenizer.chat_template."): v for k, v in md.items()
                 if k.startswith("tokenizer.chat_template.")}
    template = md.get("tokenizer.chat_template")
    if templates:
        kwargs["chat_template"] = {**templates, **({"default": template} if template else {})}
    elif template:
        kwargs["chat_template"] = template
    context = md.get(f"{md.get('general.architecture')}.context_length")
    if context:
        kwargs["model_max_length"] = int(context)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)), **kwargs)
