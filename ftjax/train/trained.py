"""A training workdir back as a model: the base re-read from its recorded source + a checkpoint's trained weights.

Only the trained part is restored (Orbax partial restore: no optimizer state is read). A LoRA run
keeps its adapters attached (exact, and exportable as PEFT); `ftjax.lora.merged` folds them in.
The frozen weights are cast to `train.frozen_dtype`, so the model computes as it did in training.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ftjax.backend_defaults import resolve_auto
from ftjax.checkpoint import Checkpoints
from ftjax.errors import ConfigError, LoadError
from ftjax.lora import apply_lora, trainable_filter
from ftjax.sharding import parse_rules, state_shardings
from ftjax.train.state import cast_floats


class _QuietReadOnly(logging.Filter):
    """Orbax warns at every read-only open that it ignores the save options; reading is all we do."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "read_only=True" not in msg and "is read only" not in msg


logging.getLogger("absl").addFilter(_QuietReadOnly())


@dataclasses.dataclass
class TrainedRun:
    config: Any  # the run's config (WORKDIR/config.json over the current defaults)
    model: nnx.Module  # base + trained weights; LoRA adapters attached for method=lora
    step: int  # the checkpoint it came from


def select_step(ckpt: Checkpoints, which: str | int | None, where: str | Path) -> int:
    """'best' (lowest eval loss, else latest), 'latest', or a step number that must exist."""
    which = "best" if which is None else which
    if str(which).isdigit():
        step = int(which)
        if step not in ckpt.all_steps():
            raise LoadError(f"{where}: no checkpoint at step {step} (have: {ckpt.all_steps()})")
        return step
    if which not in ("best", "latest"):
        raise ConfigError(f"step={which!r}: use best, latest or a step number")
    step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    if step is None:
        raise LoadError(f"{where}: no complete checkpoint in {Path(where) / 'checkpoints'}")
    return int(step)


def _default_mesh(config) -> Mesh | None:
    """The training mesh when this machine has the devices for it, else one device."""
    from ftjax.train.setup import mesh_from_config

    try:
        return mesh_from_config(config)
    except ConfigError:
        return None


def _target(trainable: nnx.State, mesh: Mesh | None, rules: dict) -> nnx.State:
    """Shape/dtype/sharding of each trained array, for Orbax to restore straight into place."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if mesh is not None:
        shardings = state_shardings(trainable, mesh, rules)
    else:
        one = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, trainable, is_leaf=is_var)

    def spec(var: nnx.Variable, sharding) -> nnx.Variable:
        x = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))

    return jax.tree.map(spec, trainable, shardings, is_leaf=is_var)


def _base(config, mesh: Mesh | None) -> nnx.Module:
    """The base as training built it; for full fine-tuning only its shapes (every weight is in the checkpoint)."""
    from ftjax import api
    from ftjax.models.registry import MODEL_CLASSES

    if config.method != "full":
        return api.load_model(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                              mesh=mesh, rules=parse_rules(config.mesh.rules), attention=config.model.attention)
    cfg = api.model_config(config.model.path, config.model.dtype).replace(
        param_dtype=config.model.param_dtype, attention=config.model.attention)
    return nnx.eval_shape(lambda: MODEL_CLASSES[cfg.model_type](cfg, rngs=nnx.Rngs(0)))


def _structure(config, base: nnx.Module) -> nnx.Module:
    """The trained model's structure, abstract: the base with adapters attached (no adapter is initialized)."""
    if config.method != "lora":
        return base

    def attach(model: nnx.Module) -> nnx.Module:
        return apply_lora(model, config.lora.rank, config.lora.alpha, targets=config.lora.targets,
                          dropout=config.lora.dropout, rslora=config.lora.rslora, rngs=nnx.Rngs(config.seed))

    return nnx.eval_shape(attach, base)


def load_trained(workdir: str | Path, step: str | int | None = "best", *, mesh: Mesh | None = None) -> TrainedRun:
    """The run in `workdir` at `step` ('best' by default, as export takes it), sharded on `mesh`
    (default: the training mesh if it fits the devices here, else one device)."""
    from ftjax.evaluation.workdir import config_from_workdir

    config = resolve_auto(config_from_workdir(workdir))  # a config.json without them: this backend's values
    mesh = mesh if mesh is not None else _default_mesh(config)
    ckpt = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False, read_only=True)
    try:
        chosen = select_step(ckpt, step, workdir)
        base = _base(config, mesh)
        graphdef, trainable, frozen = nnx.split(_structure(config, base), trainable_filter(config.method), ...)
        restored = ckpt.restore_trainable(chosen, _target(trainable, mesh, parse_rules(config.mesh.rules)))
    finally:
        ckpt.close()
    if config.method == "lora":
        frozen = nnx.state(base)  # the real base weights, where `frozen` holds only their shapes
    elif jax.tree.leaves(frozen):
        raise LoadError(f"{workdir}: the model has state outside its parameters; a full fine-tuning checkpoint "
                        "does not hold it")
    frozen_dtype = None if config.train.frozen_dtype == config.model.param_dtype else config.train.frozen_dtype
    return TrainedRun(config, nnx.merge(graphdef, restored, cast_floats(frozen, frozen_dtype)), chosen)
