"""From a config to what the loop needs: the model with adapters, sharded state, optimizer."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from ftjax.interop.sources import load_pretrained, resolve
from ftjax.models.llama import bound_segments
from ftjax.train.compose import Run, row_segments
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


def build_model(run: Run, mesh: Mesh) -> tuple[nnx.Module, bool]:
    """The pre-trained model read straight into its shardings (its frozen kernels quantized per
    train.frozen_quant), with the method's adapters attached; from a training workdir (`ftjax.workdir.start_from`),
    its trained model. Also: whether it continues an adapter."""
    m = run.model
    if resolve(m.path)[0] == "workdir":
        model, continues = start_from(m.path, run.method, run.continued_settings, mesh)
    else:
        model, continues = load_pretrained(m.path, m.dtype, m.param_dtype, mesh=mesh, rules=run.rules,
                                           remat=m.remat, attention=m.attention, quant=m.quant), False
    bound_segments(model, row_segments(run))  # the rows this run's data makes (its attention kernel)
    if not continues:  # adapters are small; place_state moves them into their shardings with everything else
        run.method.attach(model, run.schedule.seed)
    return model, continues


def build_state(run: Run, mesh: Mesh | None = None) -> Setup:
    """Model + optimizer state, every array placed by the rules table; frozen part in train.frozen_dtype.
    `mesh`: the run's own by default."""
    mesh = run.mesh if mesh is None else mesh
    model, continues = build_model(run, mesh)
    optimizer = make_optimizer(run.optim, run.schedule.steps)
    state = place_state(model, optimizer.tx, mesh, trainable=run.method.trainable, frozen_dtype=run.model.frozen_cast,
                        rules=run.rules)
    return Setup(mesh, state, optimizer, model.config, run.rules, continues)
