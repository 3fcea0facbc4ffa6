"""The public loading API: `load_model` and `load_tokenizer` for HF folders, GGUF files and named models."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from ftjax.errors import LoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_NAMES = (DEFAULT_MODEL,)


def _dtype_name(dtype) -> str:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise LoadError(f"unknown dtype {dtype!r} (use e.g. 'float32' or 'bfloat16')") from None


def resolve(path_or_name: str | Path) -> tuple[str, Path]:
    """('gguf' | 'hf', path) for a model name, a .gguf file or an HF folder."""
    s = str(path_or_name)
    if s.lower() in KNOWN_NAMES:
        from ftjax.interop.smollm2 import default_gguf_path

        return "gguf", default_gguf_path()
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LoadError(f"{p}: GGUF file not found")
        return "gguf", p
    if p.is_dir():
        return "hf", p
    raise LoadError(f"{s}: not a model folder, a .gguf file, or a known name ({', '.join(KNOWN_NAMES)})")


def load_model(path_or_name: str | Path = DEFAULT_MODEL, dtype="float32", *, param_dtype=None,
               mesh: Mesh | None = None, rules: dict | None = None, **overrides):
    """A model with `model(input_ids) -> logits [batch, length, vocab]`, sharded on `mesh` if given.

    `overrides` set ModelConfig fields such as remat="full" or attention="cudnn".
    """
    kind, path = resolve(path_or_name)
    dt = _dtype_name(dtype)
    pdt = _dtype_name(param_dtype) if param_dtype is not None else dt
    if kind == "hf":
        from ftjax.interop.hf import load_hf

        return load_hf(path, dtype=dt, param_dtype=pdt, mesh=mesh, rules=rules, **overrides)
    from ftjax.interop.gguf import read_gguf
    from ftjax.interop.tensors import DictSource, load_params
    from ftjax.models.registry import config_from_hf

    hf_config, tensors = read_gguf(path)
    cfg = config_from_hf(hf_config, dtype=dt, param_dtype=pdt, source=str(path))
    if overrides:
        cfg = cfg.replace(**overrides)
    return load_params(cfg, DictSource(tensors, str(path)), mesh, rules)


def load_tokenizer(path_or_name: str | Path = DEFAULT_MODEL):
    """The model's fast tokenizer with its chat template (no remote code, no torch)."""
    kind, path = resolve(path_or_name)
    if kind == "gguf":
        from ftjax.interop.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        raise LoadError(f"{path}: no tokenizer.json (ftjax reads fast tokenizers only)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
