"""A finished (or running) training workdir back as models: the tuned one and its base, for scripts/eval.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flax import nnx

from ftjax.errors import LoadError


@dataclasses.dataclass
class LoadedRun:
    config: Any
    model: nnx.Module  # the tuned model (LoRA adapters attached, or full weights)
    base: nnx.Module | None  # None for LoRA: the base is `model` with adapters off
    tokenizer: Any
    step: int


def config_from_workdir(workdir: str | Path) -> Any:
    """WORKDIR/config.json over the current defaults (keys this version lacks are ignored, new ones default)."""
    from ftjax.config import default_config, flat_keys

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


def load_run(workdir: str | Path, config: Any = None, mesh: Any = None, step: int | None = None, *,
             with_base: bool = True) -> LoadedRun:
    """The workdir's model at `step` (default: the latest checkpoint), built and sharded like training did."""
    from ftjax.api import load_model, load_tokenizer
    from ftjax.checkpoint import Checkpoints
    from ftjax.train.setup import build_state, mesh_from_config

    config = config if config is not None else config_from_workdir(workdir)
    mesh = mesh if mesh is not None else mesh_from_config(config)
    ckpt = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False, read_only=True)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise LoadError(f"{workdir}: no complete checkpoint to evaluate")
    setup = build_state(config, mesh)
    state = setup.state
    restored, _ = ckpt.restore(step, {"trainable": state.trainable, "opt_state": state.opt_state})
    ckpt.close()
    model = nnx.merge(state.graphdef, restored["trainable"], state.frozen)
    base = None
    if config.method == "full" and with_base:
        base = load_model(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                          mesh=mesh, rules=setup.rules)
    return LoadedRun(config, model, base, load_tokenizer(config.model.path), int(step))
