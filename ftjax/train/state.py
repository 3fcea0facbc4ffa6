"""Training state: the model split by filter into trainable and frozen parts, plus optimizer state.

Built from shapes first (`nnx.eval_shape` / `jax.eval_shape`), so every part's sharding is known
before any array exists, then materialized by a jitted init with those out shardings: no model
ever sits whole on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from ftjax.dtypes import cast_floats
from ftjax.sharding import state_shardings

Filter = Any  # an nnx filter: a Variable type such as nnx.LoRAParam or nnx.Param


@dataclasses.dataclass(frozen=True)
class StateShardings:
    """NamedSharding trees (prefixes of the state trees) for the step's in/out shardings."""

    trainable: Any
    frozen: Any
    opt_state: Any


@dataclasses.dataclass
class TrainState:
    """What a training loop carries: `trainable` and `opt_state` change every step, `frozen` never."""

    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    shardings: StateShardings

    def model(self) -> nnx.Module:
        """The model with the current weights (shares arrays; the next step donates them)."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def split(model: nnx.Module, trainable: Filter) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen): what the filter selects, and everything else."""
    return nnx.split(model, trainable, ...)


def _shardings(graph_abstract: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, trainable: Filter,
               rules: dict | None) -> tuple[nnx.GraphDef, StateShardings]:
    graphdef, abs_trainable, abs_frozen = split(graph_abstract, trainable)
    abs_opt = jax.eval_shape(tx.init, abs_trainable)
    return graphdef, StateShardings(state_shardings(abs_trainable, mesh, rules),
                                    state_shardings(abs_frozen, mesh, rules),
                                    state_shardings(abs_opt, mesh, rules))


def init_state(build: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh, *,
               trainable: Filter = nnx.Param, frozen_dtype: Any = None, rules: dict | None = None) -> TrainState:
    """Fresh state from a model constructor (random init, LoRA injection), created already sharded."""
    graphdef, shardings = _shardings(nnx.eval_shape(build), tx, mesh, trainable, rules)

    def init():
        _, t, f = split(build(), trainable)
        return t, cast_floats(f, frozen_dtype), tx.init(t)

    out = (shardings.trainable, shardings.frozen, shardings.opt_state)
    t, f, o = jax.jit(init, out_shardings=out)()
    return TrainState(graphdef, t, f, o, shardings)


def place_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *, trainable: Filter = nnx.Param,
                frozen_dtype: Any = None, rules: dict | None = None) -> TrainState:
    """State from an existing model (loaded weights, then `apply_lora`), moved into its shardings.

    Arrays already in their target sharding (a loader that read them sharded) are not copied.
    """
    graphdef, shardings = _shardings(model, tx, mesh, trainable, rules)
    _, t, f = split(model, trainable)
    t, f = _put_state(t, shardings.trainable), _put_state(f, shardings.frozen)
    if frozen_dtype is not None:
        f = jax.jit(lambda f: cast_floats(f, frozen_dtype), out_shardings=shardings.frozen)(f)
    o = jax.jit(tx.init, out_shardings=shardings.opt_state)(t)
    return TrainState(graphdef, t, f, o, shardings)


def _put_state(state: nnx.State, shardings: Any) -> nnx.State:
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def put(var: nnx.Variable, sharding: Any) -> nnx.Variable:
        if isinstance(sharding, nnx.Variable):  # a quantized weight: one sharding per array it holds
            return var.replace(jax.tree.map(_put, var.get_value(), sharding.get_value()))
        return var.replace(_put(var.get_value(), sharding))

    return jax.tree.map(put, state, shardings, is_leaf=is_var)


def _put(x: Any, sharding: Any) -> jax.Array:
    """Move one array into its sharding; a process-local array (fresh adapters, the same on every
    host) goes to a multi-host sharding through the host, slice by slice."""
    if sharding.is_fully_addressable or not getattr(x, "is_fully_addressable", True):
        return jax.device_put(x, sharding)
    local = np.asarray(x)
    return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])


def state_size(tree: Any) -> tuple[int, int]:
    """(number of array leaves, number of elements) of a state or optimizer state."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return len(leaves), int(sum(int(x.size) for x in leaves))
