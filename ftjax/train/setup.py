"""From a config to what the loop needs: the model with adapters, sharded state, optimizer."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from ftjax.backend_defaults import resolve_auto
from ftjax.dtypes import frozen_dtype
from ftjax.interop.quantized_base import from_config as frozen_quant
from ftjax.interop.sources import load_pretrained, resolve
from ftjax.methods import method_for
from ftjax.sharding import parse_rules
from ftjax.train.optimizer import Optimizer, make_optimizer
from ftjax.train.state import TrainState, place_state
from ftjax.workdir import start_from


@dataclasses.dataclass
class Setup:
    mesh: Mesh
    state: TrainState
    optimizer: Optimizer
    model_config: Any
    rules: dict  # logical axis -> mesh axes (mesh.rules over sharding.RULES) that placed the state
    continues_adapter: bool = False  # model.path is a LoRA workdir whose adapter this run trains on


def build_model(config, mesh: Mesh) -> tuple[nnx.Module, bool]:
    """The base model read straight into its shardings (its frozen kernels quantized per train.frozen_quant),
    with LoRA adapters attached for method=lora; from a training workdir (`ftjax.workdir.start_from`), its
    trained model. Also: whether it continues an adapter."""
    if resolve(config.model.path)[0] == "workdir":
        model, continues = start_from(config, mesh)
    else:
        model, continues = load_pretrained(config.model.path, config.model.dtype, config.model.param_dtype, mesh=mesh,
                                           rules=parse_rules(config.mesh.rules), remat=config.model.remat,
                                           attention=config.model.attention, quant=frozen_quant(config)), False
    if not continues:  # adapters are small; place_state moves them into their shardings with everything else
        method_for(config.method, config.lora).attach(model, config.seed)
    return model, continues


def build_state(config, mesh: Mesh) -> Setup:
    """Model + optimizer state, every array placed by the rules table; frozen part in train.frozen_dtype."""
    resolve_auto(config)  # callers that skip config.validate (benchmarks, tests) still get concrete values
    model, continues = build_model(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.steps)
    rules = parse_rules(config.mesh.rules)
    state = place_state(model, optimizer.tx, mesh, trainable=method_for(config.method, config.lora).trainable,
                        frozen_dtype=frozen_dtype(config), rules=rules)
    return Setup(mesh, state, optimizer, model.config, rules, continues)
