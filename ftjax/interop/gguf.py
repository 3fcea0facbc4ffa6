"""GGUF file -> (HF-style config dict, HF-named float32 numpy tensors), without torch.

The metadata and tensor table are parsed here (the GGUF layout is small and stable; the `gguf`
package's reader spends seconds wrapping every vocabulary string in a memmap); the tensor
bytes are dequantized with `gguf.quants.dequantize`. llama.cpp's converter interleaves the
rotary halves of llama q/k rows; `read_gguf` undoes that exactly as transformers' loader does.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftjax.errors import LoadError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF metadata value types: id -> (struct format, byte width); 8 is a string, 9 an array.
_SCALAR = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
           6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED_PER_LAYER = {
    "llama": ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
              "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"),
}
_REQUIRED_PER_LAYER["qwen2"] = _REQUIRED_PER_LAYER["llama"] + ("attn_q.bias", "attn_k.bias", "attn_v.bias")
_REQUIRED_PER_LAYER["qwen3"] = _REQUIRED_PER_LAYER["llama"] + ("attn_q_norm.weight", "attn_k_norm.weight")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's place in the file: numpy-order shape, ggml type id, absolute byte offset and size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata and tensor table; tensor bytes are not read."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    file_size: int


class _Truncated(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str, width: int):
        if self.pos + width > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def string(self) -> str:
        n = self.take("<Q", 8)
        if self.pos + n > self.size:
            raise _Truncated
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            fmt, width = _SCALAR[vtype]
            v = self.take(fmt, width)
            # a float32 value: the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
            return float(str(np.float32(v))) if vtype == 6 else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I", 4), self.take("<Q", 8)
            if etype in _SCALAR:
                fmt, width = _SCALAR[etype]
                if self.pos + count * width > self.size:
                    raise _Truncated
                raw = self.buf[self.pos:self.pos + count * width]  # a copy: the map is closed after parsing
                self.pos += count * width
                return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
            if count > self.size - self.pos:  # every element takes at least one byte
                raise _Truncated
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse metadata and tensor table; a missing, non-GGUF or truncated file is a LoadError."""
    import gguf  # only for the quant block sizes

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: GGUF file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LoadError(f"{path}: not a GGUF file (the first bytes are not the GGUF magic)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(buf, size)
        cur.pos = 4
        version = cur.take("<I", 4)
        if version not in (2, 3):
            raise LoadError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
        n_tensors, n_kv = cur.take("<Q", 8), cur.take("<Q", 8)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.take("<I", 4))
        table = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I", 4)
            dims = [cur.take("<Q", 8) for _ in range(n_dims)]
            table.append((name, tuple(reversed(dims)), cur.take("<I", 4), cur.take("<Q", 8)))
    except _Truncated:
        raise LoadError(f"{path}: truncated GGUF file (metadata runs past the end, {size} bytes)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: corrupt GGUF metadata ({e})") from None
    finally:
        buf.close()

    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, ggml_type, offset in table:
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise LoadError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
        if not shape or shape[-1] % block:
            raise LoadError(f"{path}: tensor {name} has shape {list(shape)}, not whole {block}-element blocks")
        n = int(np.prod(shape, dtype=np.int64))
        info = TensorInfo(name, shape, ggml_type, data_start + offset, n // block * block_bytes)
        if info.offset + info.nbytes > size:
            raise LoadError(f"{path}: truncated GGUF file (tensor {name} ends at byte "
                            f"{info.offset + info.nbytes}, the file has {size})")
        tensors[name] = info
    return GGUFHeader(path, metadata, tensors, size)


def _hf_config(header: GGUFHeader) -> dict[str, Any]:
    """The config.json transformers would write for this model, from llama.cpp's metadata keys."""
    md, path = header.metadata, header.path
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LoadError(f"{path}: GGUF architecture '{arch}' is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def key(name: str, default: Any = LoadError) -> Any:
        full = f"{arch}.{name}"
        if full not in md:
            if default is LoadError:
                raise LoadError(f"{path}: metadata key '{full}' is missing")
            return default
        return md[full]

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    names = header.tensors
    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = len(md["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in md else None
    if vocab is None and "token_embd.weight" in names:
        vocab = names["token_embd.weight"].shape[0]
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [_HF_CLASS[arch]],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
    }
    head_dim = key("attention.key_length", None)
    if head_dim is None and arch == "llama":
        head_dim = key("rope.dimension_count", None)  # what transformers maps for llama
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in md:
            config[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}"])
    scaling = _rope_scaling(md, arch)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(md: dict, arch: str) -> dict | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`)."""
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    if kind is None and f"{arch}.rope.scale_linear" in md:
        kind, factor = "linear", md[f"{arch}.rope.scale_linear"]
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor if factor is not None else 1.0)}
    if f"{arch}.rope.scaling.original_context_length" in md:
        scaling["original_max_position_embeddings"] = int(md[f"{arch}.rope.scaling.original_context_length"])
    return scaling


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_tensor_name(hf_name: str) -> str | None:
    """The llama.cpp name of an HF tensor (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    for gguf_name, hf in _GLOBAL_NAMES.items():
        if hf == hf_name:
            return gguf_name
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    short = {hf: g for g, hf in _LAYER_NAMES.items()}.get(m.group(2)) if m else None
    return f"blk.{m.group(1)}.{short}.{m.group(3)}" if short else None


def _expected_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF shape of each tensor a layer may hold, from the HF config (catches a mislabelled file early)."""
    h, heads, kv = hf_config["hidden_size"], hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    d = hf_config.get("head_dim") or h // heads
    ff = hf_config["intermediate_size"]
    return {"attn_norm.weight": (h,), "ffn_norm.weight": (h,), "attn_q.weight": (heads * d, h),
            "attn_k.weight": (kv * d, h), "attn_v.weight": (kv * d, h), "attn_output.weight": (h, heads * d),
            "attn_q.bias": (heads * d,), "attn_k.bias": (kv * d,), "attn_v.bias": (kv * d,),
            "attn_output.bias": (h,), "attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,),
            "ffn_gate.weight": (ff, h), "ffn_up.weight": (ff, h), "ffn_down.weight": (h, ff),
            "token_embd.weight": (hf_config["vocab_size"], h), "output.weight": (hf_config["vocab_size"], h),
            "output_norm.weight": (h,)}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute`: per head, rows (d/2, 2) interleaved back to (2, d/2) halves."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's `permute` of llama q/k rows: per head, the (2, d/2) rotary halves interleaved."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(buf: np.ndarray, info: TensorInfo, path: Path) -> np.ndarray:
    """One tensor's bytes -> float32 array in numpy order ([out, in] for a linear weight)."""
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    raw = buf[info.offset:info.offset + info.nbytes]
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(info.shape).copy()
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(*info.shape[:-1], info.shape[-1] // block * block_bytes)
    try:
        out = dequantize(rows, qtype)
    except NotImplementedError:
        raise LoadError(f"{path}: tensor {info.name} uses ggml type {qtype.name}, "
                        f"which the installed gguf package cannot dequantize") from None
    return np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)


def qtype_name(info: TensorInfo) -> str:
    """The ggml type name (Q4_1, Q8_0, F32, ...) a tensor is stored in."""
    import gguf

    return gguf.GGMLQuantizationType(info.ggml_type).name


def _rows(buf: np.ndarray, info: TensorInfo) -> np.ndarray:
    """One tensor's bytes as rows uint8 [out, bytes per row] (a copy: the file map is dropped after reading)."""
    return np.array(buf[info.offset:info.offset + info.nbytes]).reshape(info.shape[0], -1)


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The HF-style config alone (no tensor is read): cheap enough to inspect a file before loading it."""
    return _hf_config(read_gguf_header(path))


@dataclass(frozen=True)
class GGUFRows:
    """A weight kept in its file's blocks: rows uint8 [out, bytes per row] in HF row order, and its ggml type."""

    rows: np.ndarray
    qtype: str
    shape: tuple[int, ...]  # the HF [out, in] shape it stands for


def read_gguf(path: str | Path, keep: frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF config dict, {HF tensor name: float32 array in HF layout}) for a llama/qwen2/qwen3 GGUF; the tensors
    named in `keep` come as GGUFRows (their bytes as shipped, llama q/k rows put back in HF order)."""
    header = read_gguf_header(path)
    config = _hf_config(header)
    arch, path = config["model_type"], header.path
    names = header.tensors
    if "rope_freqs.weight" in names:
        raise LoadError(f"{path}: per-dimension rope frequency factors (rope_freqs.weight, llama3-style "
                        f"rope scaling) are not supported")
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}" for i in range(config["num_hidden_layers"]) for t in _REQUIRED_PER_LAYER[arch]]
    for name in required:
        if name not in names:
            raise LoadError(f"{path}: tensor '{name}' is missing (a {arch} GGUF needs it)")
    if config["vocab_size"] is None:
        raise LoadError(f"{path}: cannot tell the vocabulary size")

    shapes = _expected_shapes(config)
    buf = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain view: memmap slicing is slow
    tensors: dict[str, np.ndarray] = {}
    for name, info in names.items():
        hf = _hf_name(name)
        layer = _LAYER_RE.fullmatch(name)
        if hf is None or (layer and int(layer.group(1)) >= config["num_hidden_layers"]):
            raise LoadError(f"{path}: unexpected tensor '{name}' for architecture {arch}")
        short = f"{layer.group(2)}.{layer.group(3)}" if layer else name
        if info.shape != shapes[short]:
            raise LoadError(f"{path}: tensor '{name}' has shape {list(info.shape)}, "
                            f"expected {list(shapes[short])} from the metadata")
        w = _rows(buf, info) if hf in keep else _dequantize(buf, info, path)
        if arch == "llama" and short.startswith(("attn_q.", "attn_k.")):
            n = config["num_attention_heads"] if short.startswith("attn_q.") else config["num_key_value_heads"]
            w = np.ascontiguousarray(_unpermute(w, n))
        tensors[hf] = GGUFRows(w, qtype_name(info), info.shape) if hf in keep else w
    del buf
    return config, tensors

