"""A distillation teacher of its own (distill.teacher = a path): any model ftjax loads (HF folder, .gguf, training
workdir, known name), read straight into the frozen weights' shardings and dtype; the step reads its weights as
`Frozen.teacher` and never differentiates them."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ftjax.api import load_model, load_tokenizer, model_config
from ftjax.dtypes import cast_floats
from ftjax.errors import ConfigError
from ftjax.interop.sources import resolve
from ftjax.models.llama import Llama, ModelConfig
from ftjax.sharding import state_shardings

SELF = "self"  # distill.teacher: the student's own base model (with the teacher's prefix)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher's structure, its weights (placed) and their shardings (the step's in_shardings)."""

    graphdef: nnx.GraphDef
    params: Any
    shardings: Any

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def check_teacher_path(path: str) -> None:
    """A teacher path that does not name a model fails here, in one line, before anything is loaded."""
    if str(path) != SELF:
        resolve(path)  # LoadError: not a model folder, a .gguf file, a workdir or a known name


def check_teacher_fits(path: str, vocab_size: int, tokenizer: Any) -> None:
    """The teacher must score the student's tokens: the same vocabulary size and token ids."""
    cfg = model_config(path)
    if cfg.vocab_size != vocab_size:
        raise ConfigError(f"config.distill.teacher={path}: its vocabulary has {cfg.vocab_size} tokens, the student's "
                          f"{vocab_size}; distillation compares next-token distributions over the same vocabulary")
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"config.distill.teacher={path}: its tokenizer's vocabulary differs from the student's; "
                          "distillation needs the same token ids on both sides")


def load_teacher(path: str, dtype: str, param_dtype: str, frozen_cast: Any, mesh: Mesh, rules: dict) -> Teacher:
    """The teacher at `path` in the run's compute dtype, its weights in the frozen dtype, placed by the rules."""
    model = load_model(path, dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    graphdef, params = nnx.split(model)
    shardings = state_shardings(params, mesh, rules)
    params = jax.jit(lambda p: cast_floats(p, frozen_cast), out_shardings=shardings)(params)
    return Teacher(graphdef, params, shardings)


def parameter_count(cfg: ModelConfig) -> int:
    """Weights of a model of this config (shapes only, nothing allocated)."""
    abstract = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))


def teacher_bytes(path: str, student: ModelConfig, student_bytes: int) -> int:
    """Bytes per device of the teacher's weights: the student's base weights' bytes per device (`student_bytes`,
    sharded by the same rules, in the same dtype) scaled by the teacher's weight count."""
    return int(student_bytes * parameter_count(model_config(path)) / max(1, parameter_count(student)))
