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

from ftjax.backend_defaults import resolve_auto
from ftjax.checkpoint import Checkpoints
from ftjax.config import default_config, flat_keys
from ftjax.dtypes import cast_floats, frozen_dtype
from ftjax.errors import ConfigError, LoadError
from ftjax.interop.quantized_base import from_config as frozen_quant
from ftjax.interop.sources import load_pretrained, pretrained_config, resolve
from ftjax.methods import method_for
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


def _default_mesh(config) -> Mesh | None:
    """The training mesh when this machine has the devices for it, else one device."""
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


def _base(config, mesh: Mesh | None) -> tuple[nnx.Module, bool]:
    """(The base as training built it, quantized as it was, whether it holds the adapter the run continued); for
    full fine-tuning of a pre-trained model only its shapes (every weight is in the checkpoint). A workdir base:
    `start_from`."""
    if resolve(config.model.path)[0] == "workdir":
        return start_from(config, mesh)
    return _pretrained_base(config, mesh), False


def _pretrained_base(config, mesh: Mesh | None) -> nnx.Module:
    if not method_for(config.method, config.lora).checkpoint_holds_every_weight:
        return load_pretrained(config.model.path, config.model.dtype, config.model.param_dtype, mesh=mesh,
                               rules=parse_rules(config.mesh.rules), attention=config.model.attention,
                               quant=frozen_quant(config))
    cfg = pretrained_config(config.model.path, config.model.dtype).replace(
        param_dtype=config.model.param_dtype, attention=config.model.attention)
    return nnx.eval_shape(lambda: MODEL_CLASSES[cfg.model_type](cfg, rngs=nnx.Rngs(0)))


def _structure(config, base: nnx.Module) -> nnx.Module:
    """The trained model's structure, abstract: the base with adapters attached (no adapter is initialized)."""
    method = method_for(config.method, config.lora)
    if method.checkpoint_holds_every_weight:
        return base
    return nnx.eval_shape(lambda model: method.attach(model, config.seed), base)


def load_trained(workdir: str | Path, step: str | int | None = "best", *, mesh: Mesh | None = None) -> TrainedRun:
    """The run in `workdir` at `step` (best, latest or N; 'best' by default), sharded on `mesh` (default: the
    training mesh if it fits the devices here, else one device). Process 0 prints which step it took."""
    config = resolve_auto(config_from_workdir(workdir))  # a config.json without them: this backend's values
    mesh = mesh if mesh is not None else _default_mesh(config)
    ckpt = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False, read_only=True)
    try:
        chosen = select_step(ckpt, step, workdir)
        base, continued = _base(config, mesh)
        structure = base if continued else _structure(config, base)  # a continued adapter is already attached
        graphdef, trainable, frozen = nnx.split(structure, method_for(config.method, config.lora).trainable, ...)
        restored = ckpt.restore_trainable(chosen, _target(trainable, mesh, parse_rules(config.mesh.rules)))
    finally:
        ckpt.close()
    if not method_for(config.method, config.lora).checkpoint_holds_every_weight:
        if not continued:  # a continued adapter's model holds the real base weights already
            frozen = nnx.state(base)  # the real base weights, where `frozen` holds only their shapes
    elif jax.tree.leaves(frozen):
        raise LoadError(f"{workdir}: the model has state outside its parameters; a full fine-tuning checkpoint "
                        "does not hold it")
    if jax.process_index() == 0:
        print(f"{workdir}: checkpoint step {chosen} ({'best' if step is None else step})", flush=True)
    return TrainedRun(config, nnx.merge(graphdef, restored, cast_floats(frozen, frozen_dtype(config))), chosen)


CONTINUED_KEYS = ("model.dtype", "model.param_dtype", "lora.rank", "lora.alpha", "lora.targets", "lora.rslora",
                  "lora.dropout", "train.frozen_quant", "train.frozen_quant_scope")


def start_from(config, mesh: Mesh | None = None) -> tuple[nnx.Module, bool]:
    """(model, continues its adapter) for a run whose `model.path` is a training workdir (SFT, then DPO): its
    best checkpoint. LoRA on a LoRA workdir continues that adapter (its lora.* and dtypes must be the same); full
    fine-tuning of a LoRA workdir starts from the merged weights; a full workdir's weights are the new base."""
    run = load_trained(config.model.path, mesh=mesh)
    before = method_for(run.config.method, run.config.lora)
    if method_for(config.method, config.lora).continues(before):
        for key in CONTINUED_KEYS:
            group, leaf = key.split(".")
            was, now = run.config[group][leaf], config[group][leaf]
            if was != now:
                raise ConfigError(f"config.{key}={now!r} differs from the adapter it continues in "
                                  f"{config.model.path} ({was!r}); set it to that value or start from a merged export")
        return run.model, True
    return before.full_weights(run.model), False
