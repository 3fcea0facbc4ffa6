"""The run's train step compiled from abstract shapes (nothing is allocated), and XLA's byte count of it.

The check on the pre-compile estimate (ftjax/train/memory.py): an 8B or 70B step compiles on a laptop CPU
this way, for the mesh's platform (a mesh of abstract TPU devices compiles the TPU program), and
`memory_analysis()` says what one device would hold: arguments (weights, optimizer state, batch) plus outputs
not aliased to them plus temporaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ftjax.data.packing import BATCH_KEYS
from ftjax.dtypes import cast_floats
from ftjax.errors import ConfigError
from ftjax.models.llama import ModelConfig
from ftjax.objectives.terms import TASK, uses_reference
from ftjax.sharding import state_shardings
from ftjax.train.compose import Run, loss_terms
from ftjax.train.memory import abstract_model
from ftjax.train.optimizer import make_optimizer
from ftjax.train.state import StateShardings
from ftjax.train.step import Frozen, TrainStep


def compiled_step(run: Run, model_cfg: ModelConfig, mesh: Mesh | None = None) -> jax.stages.Compiled:
    """The composed run's TrainStep (its loss terms, remat, frozen dtype/quantization, attention kernel) lowered
    from shapes with the run's shardings over `mesh` (default: the run's own; a TPU slice's abstract devices on a
    CPU host, `auto` resolved for them by compose) and compiled for the mesh's platform."""
    mesh = run.mesh if mesh is None else mesh
    if not run.objective.compiles_from_shapes:
        raise ConfigError(f"config.objective={run.objective.name!r}: its batches have no shape-only form yet "
                          "(compiling from shapes covers objectives whose batches are plain rows)")
    m = run.model
    model_cfg = model_cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
    graphdef, trainable, frozen = nnx.split(abstract_model(run.method, m, model_cfg), run.method.trainable, ...)
    frozen = jax.eval_shape(lambda f: cast_floats(f, run.model.frozen_cast), frozen)
    optimizer = make_optimizer(run.optim, run.schedule.steps)
    opt_state = jax.eval_shape(optimizer.tx.init, trainable)
    rules = run.rules
    shardings = StateShardings(*(state_shardings(s, mesh, rules) for s in (trainable, frozen, opt_state)))
    terms = loss_terms(run, model_cfg)
    with_start_copy = run.method.keeps_start_copy and uses_reference(terms)  # as the loop builds it
    step = TrainStep(graphdef, optimizer, mesh, shardings, terms, grad_accum=run.schedule.grad_accum, rules=rules,
                     with_start_copy=with_start_copy)
    shape = (run.schedule.batch_size, run.schedule.seq_len)
    rows = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32) for k in BATCH_KEYS}
    batch = {**rows, **{s: rows for s in step.streams if s != TASK}}  # a retain stream has the batch's shape
    return step.lower(trainable, opt_state, Frozen(frozen, trainable if with_start_copy else None), batch,
                      jax.random.key(0)).compile()


def step_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's bytes per device of a compiled step: its parts and their total (arguments + unaliased outputs +
    temporaries)."""
    stats = compiled.memory_analysis()
    parts = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
             "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
             "generated_code": stats.generated_code_size_in_bytes}
    parts["total"] = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
    return parts


def compiled_step_bytes(run: Run, model_cfg: ModelConfig, mesh: Mesh | None = None) -> int:
    """Bytes per device of the compiled step: arguments + unaliased outputs + temporaries."""
    return step_bytes(compiled_step(run, model_cfg, mesh))["total"]
