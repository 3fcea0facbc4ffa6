"""From a config to what the loop needs: mesh, tokenizer, data, model with adapters, sharded state."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from ftjax import api
from ftjax.backend_defaults import resolve_auto
from ftjax.lora import apply_lora, trainable_filter
from ftjax.sharding import make_mesh, parse_rules
from ftjax.train.optimizer import Optimizer, make_optimizer
from ftjax.train.state import TrainState, place_state


@dataclasses.dataclass
class Setup:
    mesh: Mesh
    state: TrainState
    optimizer: Optimizer
    model_config: Any
    rules: dict  # logical axis -> mesh axes (mesh.rules over sharding.RULES) that placed the state


def mesh_from_config(config) -> Mesh:
    """The (data, fsdp, tensor) mesh over every process's devices."""
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def build_model(config, mesh: Mesh) -> nnx.Module:
    """The base model read straight into its shardings, with LoRA adapters attached for method=lora."""
    model = api.load_model(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                           mesh=mesh, rules=parse_rules(config.mesh.rules), remat=config.model.remat,
                           attention=config.model.attention)
    if config.method == "lora":
        # Adapters are small; place_state moves them into their shardings with everything else.
        apply_lora(model, config.lora.rank, config.lora.alpha, targets=config.lora.targets,
                   dropout=config.lora.dropout, rslora=config.lora.rslora, rngs=nnx.Rngs(config.seed))
    return model


def build_state(config, mesh: Mesh) -> Setup:
    """Model + optimizer state, every array placed by the rules table; frozen part in train.frozen_dtype."""
    resolve_auto(config)  # callers that skip config.validate (benchmarks, tests) still get concrete values
    model = build_model(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.steps)
    frozen_dtype = None if config.train.frozen_dtype == config.model.param_dtype else config.train.frozen_dtype
    rules = parse_rules(config.mesh.rules)
    state = place_state(model, optimizer.tx, mesh, trainable=trainable_filter(config.method),
                        frozen_dtype=frozen_dtype, rules=rules)
    return Setup(mesh, state, optimizer, model.config, rules)

