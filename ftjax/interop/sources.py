"""Pre-trained models by where they come from: a known name, a .gguf file, an HF folder, the tiny random model.

`resolve` also recognizes a training workdir (its kind is "workdir"); loading one is `ftjax.workdir`'s job,
and `ftjax.load_model` dispatches between the two.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from ftjax.config import DEFAULT_MODEL
from ftjax.errors import ConfigError, LoadError
from ftjax.interop.gguf import read_gguf, read_gguf_config
from ftjax.interop.gguf_tokenizer import gguf_tokenizer
from ftjax.interop.hf import load_hf, read_config
from ftjax.interop.hf_config import read_json
from ftjax.interop.quantized_base import FrozenQuant, quantize_in_place
from ftjax.interop.smollm2 import default_gguf_path
from ftjax.interop.tensors import DictSource, load_params, quantized_tensor_names
from ftjax.models.llama import Llama, ModelConfig
from ftjax.models.registry import config_from_hf
from ftjax.sharding import splits, state_shardings

TINY_MODEL = "tiny-random-llama"  # random weights, SmolLM2's tokenizer: seconds per run, for tests and smoke runs
KNOWN_NAMES = (DEFAULT_MODEL, TINY_MODEL)


def tiny_config(dtype: str = "float32", param_dtype: str | None = None) -> ModelConfig:
    """A two-layer Llama shape over SmolLM2's vocabulary (dims divide 2, 4 and 8-way meshes)."""
    return ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       dtype=dtype, param_dtype=param_dtype or dtype)


def is_workdir(path: Path) -> bool:
    """A training workdir: checkpoints/ and ftjax's run config (which, unlike an HF config, has `method`)."""
    cfg = path / "config.json"
    if not ((path / "checkpoints").is_dir() and cfg.is_file()):
        return False
    try:
        return "method" in json.loads(cfg.read_text())
    except ValueError:
        return False


def resolve(path_or_name: str | Path) -> tuple[str, Path]:
    """('tiny' | 'gguf' | 'hf' | 'workdir', path) for a model name, a .gguf file, an HF folder or a workdir."""
    s = str(path_or_name)
    if s.lower() == TINY_MODEL:
        return "tiny", Path(s)
    if s.lower() in KNOWN_NAMES:
        return "gguf", default_gguf_path()
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LoadError(f"{p}: GGUF file not found")
        return "gguf", p
    if p.is_dir():
        return ("workdir" if is_workdir(p) else "hf"), p
    raise LoadError(f"{s}: not a model folder, a .gguf file, or a known name ({', '.join(KNOWN_NAMES)})")


def _pretrained(path_or_name: str | Path) -> tuple[str, Path]:
    kind, path = resolve(path_or_name)
    if kind == "workdir":
        raise LoadError(f"{path}: a training workdir, not a pre-trained model (load it with ftjax.load_model)")
    return kind, path


def load_pretrained(path_or_name: str | Path, dtype: str, param_dtype: str, *, mesh: Mesh | None = None,
                    rules: dict | None = None, quant: FrozenQuant | None = None, **overrides) -> nnx.Module:
    """The pre-trained model with its weights (dtypes as names), read straight into its shardings on `mesh`;
    with `quant`, the kernels it selects held quantized (a GGUF's own blocks for scheme gguf)."""
    kind, path = _pretrained(path_or_name)
    if quant is not None and quant.scheme == "gguf" and kind != "gguf":
        raise ConfigError(f"train.frozen_quant=gguf keeps a .gguf file's own blocks, but model.path={path_or_name} "
                          "is not a .gguf file; use frozen_quant=nf4 or int8")
    if kind == "tiny":
        model = _tiny_model(dtype, param_dtype, mesh, rules, **overrides)
        return model if quant is None else quantize_in_place(model, quant, mesh, rules)
    if kind == "hf":
        return load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, quant=quant, **overrides)
    cfg = config_from_hf(read_gguf_config(path), dtype=dtype, param_dtype=param_dtype, source=str(path))
    if overrides:
        cfg = cfg.replace(**overrides)
    keep = frozenset()
    if quant is not None and quant.scheme == "gguf":  # the selected kernels' tensors stay in their blocks
        keep = frozenset(quantized_tensor_names(cfg, quant))
    _, tensors = read_gguf(path, keep=keep)
    return load_params(cfg, DictSource(tensors, str(path)), mesh, rules, quant=quant)


def pretrained_config(path_or_name: str | Path, dtype: str) -> ModelConfig:
    """The ModelConfig alone (no weights read)."""
    kind, path = _pretrained(path_or_name)
    if kind == "tiny":
        return tiny_config(dtype)
    if kind == "hf":
        return config_from_hf(read_config(path), dtype=dtype, source=str(path / "config.json"))
    return config_from_hf(read_gguf_config(path), dtype=dtype, source=str(path))


def pretrained_tokenizer(path_or_name: str | Path):
    """The model's fast tokenizer with its chat template (no remote code, no torch)."""
    kind, path = _pretrained(path_or_name)
    if kind == "tiny":
        return pretrained_tokenizer(DEFAULT_MODEL)
    if kind == "gguf":
        return gguf_tokenizer(path)
    if not (path / "tokenizer.json").is_file():
        raise LoadError(f"{path}: no tokenizer.json (ftjax reads fast tokenizers only)")
    from transformers import PreTrainedTokenizerFast  # heavy; only HF folders need it here

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def hf_configs(path_or_name: str | Path) -> tuple[dict | None, dict | None]:
    """(config.json dict, generation_config.json dict) of a pre-trained model, where it has them: an HF
    folder's own files, a GGUF's derived config; None for the built-in random tiny model."""
    kind, path = _pretrained(path_or_name)
    if kind == "hf":
        return read_config(path), read_json(path / "generation_config.json")
    if kind == "gguf":
        return read_gguf_config(path), None
    return None, None


def _tiny_model(dtype: str, param_dtype: str, mesh: Mesh | None, rules: dict | None, seed: int = 0, **overrides):
    """The tiny random model, initialized directly into its shardings (seeded, reproducible)."""
    cfg = tiny_config(dtype, param_dtype).replace(**overrides)
    cfg = cfg.replace(fuse_qkv=cfg.fuse_qkv and not splits(mesh, rules, "heads", "kv"))
    if mesh is None:
        return Llama(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed))))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
