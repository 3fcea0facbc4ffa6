"""The public loading API: `load_model` and `load_tokenizer` for HF folders, GGUF files and named models."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from ftjax.errors import LoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"  # random weights, SmolLM2's tokenizer: seconds per run, for tests and smoke runs
KNOWN_NAMES = (DEFAULT_MODEL, TINY_MODEL)


def tiny_config(dtype: str = "float32", param_dtype: str | None = None):
    """A two-layer Llama shape over SmolLM2's vocabulary (dims divide 2, 4 and 8-way meshes)."""
    from ftjax.models.llama import ModelConfig

    return ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       dtype=dtype, param_dtype=param_dtype or dtype)


def _dtype_name(dtype) -> str:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise LoadError(f"unknown dtype {dtype!r} (use e.g. 'float32' or 'bfloat16')") from None


def is_workdir(path: Path) -> bool:
    """A training workdir: checkpoints/ and ftjax's run config (which, unlike an HF config, has `method`)."""
    import json

    cfg = path / "config.json"
    if not ((path / "checkpoints").is_dir() and cfg.is_file()):
        return False
    try:
        return "method" in json.loads(cfg.read_text())
    except ValueError:
        return False


def _run_config(path: Path):
    from ftjax.evaluation.workdir import config_from_workdir

    return config_from_workdir(path)


def resolve(path_or_name: str | Path) -> tuple[str, Path]:
    """('tiny' | 'gguf' | 'hf' | 'workdir', path) for a model name, a .gguf file, an HF folder or a workdir."""
    s = str(path_or_name)
    if s.lower() == TINY_MODEL:
        return "tiny", Path(s)
    if s.lower() in KNOWN_NAMES:
        from ftjax.interop.smollm2 import default_gguf_path

        return "gguf", default_gguf_path()
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LoadError(f"{p}: GGUF file not found")
        return "gguf", p
    if p.is_dir():
        return ("workdir" if is_workdir(p) else "hf"), p
    raise LoadError(f"{s}: not a model folder, a .gguf file, or a known name ({', '.join(KNOWN_NAMES)})")


def load_model(path_or_name: str | Path = DEFAULT_MODEL, dtype="float32", *, param_dtype=None,
               mesh: Mesh | None = None, rules: dict | None = None, **overrides):
    """A model with `model(input_ids) -> logits [batch, length, vocab]`, sharded on `mesh` if given.

    `overrides` set ModelConfig fields such as remat="full" or attention="cudnn". A training workdir
    gives its best checkpoint (lowest eval loss, else the latest) over the recorded base, in the run's
    own dtypes, LoRA adapters attached (`ftjax.lora.merged` folds them in); another step:
    `ftjax.train.trained.load_trained(workdir, step)`.
    """
    kind, path = resolve(path_or_name)
    dt = _dtype_name(dtype)
    pdt = _dtype_name(param_dtype) if param_dtype is not None else dt
    if kind == "tiny":
        return _tiny_model(dt, pdt, mesh, rules, **overrides)
    if kind == "workdir":  # base + trained weights of the best checkpoint (LoRA adapters attached)
        from ftjax.train.trained import load_trained

        return load_trained(path, mesh=mesh).model
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


def model_config(path_or_name: str | Path = DEFAULT_MODEL, dtype="float32"):
    """The ModelConfig alone (no weights read): vocab size, shapes, for checks before compute."""
    kind, path = resolve(path_or_name)
    dt = _dtype_name(dtype)
    if kind == "tiny":
        return tiny_config(dt)
    if kind == "workdir":
        return model_config(_run_config(path).model.path, dtype)
    from ftjax.models.registry import config_from_hf

    if kind == "hf":
        from ftjax.interop.hf import read_config

        return config_from_hf(read_config(path), dtype=dt, source=str(path / "config.json"))
    from ftjax.interop.gguf import read_gguf_config

    return config_from_hf(read_gguf_config(path), dtype=dt, source=str(path))


def load_tokenizer(path_or_name: str | Path = DEFAULT_MODEL):
    """The model's fast tokenizer with its chat template (no remote code, no torch)."""
    kind, path = resolve(path_or_name)
    if kind == "tiny":
        return load_tokenizer(DEFAULT_MODEL)
    if kind == "workdir":
        return load_tokenizer(_run_config(path).model.path)
    if kind == "gguf":
        from ftjax.interop.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        raise LoadError(f"{path}: no tokenizer.json (ftjax reads fast tokenizers only)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _tiny_model(dtype: str, param_dtype: str, mesh: Mesh | None, rules: dict | None, seed: int = 0, **overrides):
    """The tiny random model, initialized directly into its shardings (seeded, reproducible)."""
    import jax
    from flax import nnx

    from ftjax.models.llama import Llama
    from ftjax.sharding import splits, state_shardings

    cfg = tiny_config(dtype, param_dtype).replace(**overrides)
    cfg = cfg.replace(fuse_qkv=cfg.fuse_qkv and not splits(mesh, rules, "heads", "kv"))
    if mesh is None:
        return Llama(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed))))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
