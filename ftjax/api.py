"""The public loading API: `load_model`, `model_config` and `load_tokenizer` for HF folders, GGUF files,
named models and training workdirs (`ftjax.interop.sources` loads the first three, `ftjax.workdir` the last)."""

from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from ftjax.config import DEFAULT_MODEL
from ftjax.dtypes import dtype_name
from ftjax.errors import ConfigError
from ftjax.interop import sources
from ftjax.models.llama import ModelConfig
from ftjax.workdir import config_from_workdir, load_trained


def load_model(path_or_name: str | Path = DEFAULT_MODEL, dtype="float32", *, param_dtype=None,
               mesh: Mesh | None = None, rules: dict | None = None, step: str | int | None = None, **overrides):
    """A model with `model(input_ids) -> logits [batch, length, vocab]`, sharded on `mesh` if given.

    `overrides` set ModelConfig fields such as remat="full" or attention="cudnn". A training workdir
    gives the checkpoint `step` (best, latest or N; default: the best, i.e. lowest eval loss, else the
    latest) over the recorded base, in the run's own dtypes, LoRA adapters attached (`ftjax.lora.merged`
    folds them in).
    """
    kind, path = sources.resolve(path_or_name)
    if kind == "workdir":
        return load_trained(path, step, mesh=mesh).model
    if step is not None:
        raise ConfigError(f"step={step!r} applies to a training workdir; {path_or_name} is a pre-trained model")
    pdt = dtype_name(param_dtype) if param_dtype is not None else dtype_name(dtype)
    return sources.load_pretrained(path_or_name, dtype_name(dtype), pdt, mesh=mesh, rules=rules, **overrides)


def model_config(path_or_name: str | Path = DEFAULT_MODEL, dtype="float32") -> ModelConfig:
    """The ModelConfig alone (no weights read): vocab size, shapes, for checks before compute."""
    kind, path = sources.resolve(path_or_name)
    if kind == "workdir":
        return model_config(config_from_workdir(path).model.path, dtype)
    return sources.pretrained_config(path_or_name, dtype_name(dtype))


def load_tokenizer(path_or_name: str | Path = DEFAULT_MODEL):
    """The model's fast tokenizer with its chat template (no remote code, no torch)."""
    kind, path = sources.resolve(path_or_name)
    if kind == "workdir":
        return load_tokenizer(config_from_workdir(path).model.path)
    return sources.pretrained_tokenizer(path_or_name)
