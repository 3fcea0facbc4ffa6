"""A training workdir: its config, its checkpoints (best / latest / N) and its trained model, the one loader
that `ftjax.load_model(WORKDIR)`, scripts/eval.py, scripts/export.py and scripts/generate.py share.

Only the trained part is restored (Orbax partial restore: no optimizer state is read). A LoRA run keeps
its adapters attached (exact, and exportable as PEFT); `ftjax.lora.merged` folds them in. The frozen
weights are cast to `train.frozen_dtype`, so the model computes as it did in training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ftjax import workdir_lock
from ftjax.backend_defaults import resolve_auto
from ftjax.checkpoint import Checkpoints
from ftjax.config import default_config, flat_keys
from ftjax.dtypes import cast_floats, frozen_dtype
from ftjax.errors import ConfigError, LoadError
from ftjax.interop.quantized_base import frozen_quant
from ftjax.interop.sources import load_pretrained, pretrained_config, resolve
from ftjax.methods import Method, method_for
from ftjax.models.registry import MODEL_CLASSES
from ftjax.sharding import mesh_from_config, parse_rules, state_shardings

STEP_CHOICES = "best, latest or a step number"


@dataclasses.dataclass
class TrainedRun:
    config: Any  # the run's config (WORKDIR/config.json over the current defaults)
    model: nnx.Module  # base + trained weights; LoRA adapters attached for method=lora
    step: int  # the checkpoint it came from


def config_from_workdir(workdir: str | Path) -> Any:
    """WORKDIR/config.json over the current defaults (keys this version lacks are ignored, new ones default)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise LoadError(f"{workdir}: no config.json (is this a training workdir?)")
    saved = json.loads(path.read_text())
    c = default_config()
    valid = set(flat_keys(c))

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif key in valid:
                node = c
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node[p]
                node[leaf] = v

    walk(saved)
    return c


def select_step(ckpt: Checkpoints, which: str | int | None, where: str | Path) -> int:
    """'best' (lowest eval loss, else latest), 'latest', or a step number that must exist."""
    which = "best" if which is None else which
    if str(which).isdigit():
        step = int(which)
        if step not in ckpt.all_steps():
            raise LoadError(f"{where}: no checkpoint at step {step} (have: {ckpt.all_steps()})")
        return step
    if which not in ("best", "latest"):
        raise ConfigError(f"step={which!r}: use {STEP_CHOICES}")
    step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    if step is None:
        raise LoadError(f"{where}: no complete checkpoint in {Path(where) / 'checkpoints'}")
    return int(step)


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What loading a trained run needs of its recorded config: the pre-trained model, how it was held, the
    method, the seed that attached the adapters, the rules that placed the weights."""

    model_path: str
    dtype: str
    param_dtype: str
    attention: str
    frozen_dtype: str | None  # the cast of the frozen weights (None: the parameter dtype)
    quant: Any  # ftjax.interop.quantized_base.FrozenQuant, or None
    method: Method
    seed: int
    rules: dict
    settings: dict  # CONTINUED_KEYS -> value: what a run continuing its adapter must share


def recorded(config) -> Recorded:
    """A trained run's config (`auto` resolved) read into what loading it needs."""
    m, t = config.model, config.train
    return Recorded(str(m.path), m.dtype, m.param_dtype, m.attention, frozen_dtype(t.frozen_dtype, m.param_dtype),
                    frozen_quant(t.frozen_quant, t.frozen_quant_scope, config.lora.targets, m.dtype),
                    method_for(config.method, config.lora), int(config.seed), parse_rules(config.mesh.rules),
                    {key: config[key.split(".")[0]][key.split(".")[1]] for key in CONTINUED_KEYS})


def _default_mesh(mesh_settings: Any) -> Mesh | None:
    """The training mesh (`mesh.*`) when this machine has the devices for it, else one device."""
    try:
        return mesh_from_config(mesh_settings)
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


def _start(run: Recorded, mesh: Mesh | None) -> tuple[nnx.Module, bool]:
    """(The model training started from, quantized as it was, whether it holds the adapter the run continued);
    for full fine-tuning of a pre-trained model only its shapes (every weight is in the checkpoint). A workdir:
    `start_from`."""
    if resolve(run.model_path)[0] == "workdir":
        return start_from(run.model_path, run.method, run.settings, mesh)
    return _pretrained(run, mesh), False


def _pretrained(run: Recorded, mesh: Mesh | None) -> nnx.Module:
    if not run.method.checkpoint_holds_every_weight:
        return load_pretrained(run.model_path, run.dtype, run.param_dtype, mesh=mesh, rules=run.rules,
                               attention=run.attention, quant=run.quant)
    cfg = pretrained_config(run.model_path, run.dtype).replace(param_dtype=run.param_dtype, attention=run.attention)
    return nnx.eval_shape(lambda: MODEL_CLASSES[cfg.model_type](cfg, rngs=nnx.Rngs(0)))


def _structure(run: Recorded, start: nnx.Module) -> nnx.Module:
    """The trained model's structure, abstract: adapters attached to the start (no adapter is initialized)."""
    if run.method.checkpoint_holds_every_weight:
        return start
    return nnx.eval_shape(lambda model: run.method.attach(model, run.seed), start)


def load_trained(workdir: str | Path, step: str | int | None = "best", *, mesh: Mesh | None = None) -> TrainedRun:
    """The run in `workdir` at `step` (best, latest or N; 'best' by default), sharded on `mesh` (default: the
    training mesh if it fits the devices here, else one device). Process 0 prints which step it took."""
    config = resolve_auto(config_from_workdir(workdir))  # a config.json without them: this backend's values
    run = recorded(config)
    mesh = mesh if mesh is not None else _default_mesh(config.mesh)
    ckpt = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False, read_only=True)
    try:
        chosen = select_step(ckpt, step, workdir)
        start, continued = _start(run, mesh)
        structure = start if continued else _structure(run, start)  # a continued adapter is already attached
        graphdef, trainable, frozen = nnx.split(structure, run.method.trainable, ...)
        restored = ckpt.restore_trainable(chosen, _target(trainable, mesh, run.rules))
    finally:
        ckpt.close()
    if not run.method.checkpoint_holds_every_weight:
        if not continued:  # a continued adapter's model holds the real pre-trained weights already
            frozen = nnx.state(start)  # the real pre-trained weights, where `frozen` holds only their shapes
    elif jax.tree.leaves(frozen):
        raise LoadError(f"{workdir}: the model has state outside its parameters; a full fine-tuning checkpoint "
                        "does not hold it")
    if jax.process_index() == 0:
        held = workdir_lock.holder(workdir)  # a run still writing it: Orbax lists only its complete checkpoints
        print(f"{workdir}: checkpoint step {chosen} ({'best' if step is None else step})" +
              (f"; a run holds this workdir ({held}): read from its complete checkpoints only" if held else ""),
              flush=True)
    return TrainedRun(config, nnx.merge(graphdef, restored, cast_floats(frozen, run.frozen_dtype)), chosen)


CONTINUED_KEYS = ("model.dtype", "model.param_dtype", "lora.rank", "lora.alpha", "lora.targets", "lora.rslora",
                  "lora.dropout", "train.frozen_quant", "train.frozen_quant_scope")


def start_from(path: str, method: Method, settings: dict, mesh: Mesh | None = None) -> tuple[nnx.Module, bool]:
    """(model, continues its adapter) for a run of `method` whose `model.path` is a training workdir `path` (SFT,
    then DPO): its best checkpoint. LoRA on a LoRA workdir continues that adapter (its lora.* and dtypes, the
    run's `settings` of CONTINUED_KEYS, must be the same); full fine-tuning of a LoRA workdir starts from the
    merged weights; a full workdir's weights are the new pre-trained model."""
    trained = load_trained(path, mesh=mesh)
    before = recorded(trained.config)
    if method.continues(before.method):
        for key in CONTINUED_KEYS:
            was, now = before.settings[key], settings[key]
            if was != now:
                raise ConfigError(f"config.{key}={now!r} differs from the adapter it continues in "
                                  f"{path} ({was!r}); set it to that value or start from a merged export")
        return trained.model, True
    return before.method.full_weights(trained.model), False
