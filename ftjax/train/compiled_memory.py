"""XLA's own byte count of a run's train step, compiled from abstract shapes (nothing is allocated).

The check on the pre-compile estimate (ftjax/train/memory.py): an 8B or 70B step compiles on a laptop CPU
in seconds this way, and `memory_analysis()` says what one device would hold: arguments (weights, optimizer
state, batch) plus outputs not aliased to them plus temporaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ftjax.backend_defaults import resolve_auto
from ftjax.config import has_auto
from ftjax.data.packing import BATCH_KEYS
from ftjax.dtypes import cast_floats, frozen_dtype
from ftjax.methods import method_for
from ftjax.models.llama import ModelConfig
from ftjax.objectives.terms import cross_entropy
from ftjax.sharding import parse_rules, state_shardings
from ftjax.train.memory import abstract_model
from ftjax.train.optimizer import make_optimizer
from ftjax.train.state import StateShardings
from ftjax.train.step import TrainStep


def compiled_step_bytes(config, model_cfg: ModelConfig, mesh: Mesh) -> int:
    """Bytes per device of the compiled step: arguments + unaliased outputs + temporaries (`auto` values still in
    `config` resolved for this backend)."""
    if has_auto(config):
        resolve_auto(config)
    model_cfg = model_cfg.replace(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                  remat=config.model.remat, attention=config.model.attention)
    graphdef, trainable, frozen = nnx.split(abstract_model(config, model_cfg), method_for(config.method, config.lora).trainable, ...)
    frozen = jax.eval_shape(lambda f: cast_floats(f, frozen_dtype(config.train.frozen_dtype, config.model.param_dtype)), frozen)
    optimizer = make_optimizer(config.optim, config.train.steps)
    opt_state = jax.eval_shape(optimizer.tx.init, trainable)
    rules = parse_rules(config.mesh.rules)
    shardings = StateShardings(*(state_shardings(s, mesh, rules) for s in (trainable, frozen, opt_state)))
    step = TrainStep(graphdef, optimizer, mesh, shardings, [cross_entropy(config.train.loss_chunk)],
                     grad_accum=config.train.grad_accum, rules=rules)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32) for k in BATCH_KEYS}
    stats = step.lower(trainable, opt_state, frozen, batch, jax.random.key(0)).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
