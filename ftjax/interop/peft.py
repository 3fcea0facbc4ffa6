"""PEFT adapter format: ftjax LoRA adapters <-> adapter_config.json + adapter_model.safetensors.

PEFT names each factor `base_model.model.<HF module>.lora_A.weight` [r, in] and `lora_B.weight`
[out, r] (torch Linear layout, the transpose of ftjax's A [in, r] / B [r, out]); its scale is
lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, the same as `ftjax.lora.LoRA.scale`.

The experts' adapters go through PEFT's `target_parameters` on transformers 5's fused 3-D expert weights
(`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]): PEFT's ParamWrapper holds one
`lora_A.weight` [E·r, in] (expert-major rows) and one `lora_B.weight` [out, r·E] (rank-major columns) per
weight, and nests its wrappers in the module's parameter order, so gate_up_proj's factors sit under
`experts.base_layer.` when down_proj is adapted too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.config import DEFAULT_MODEL
from ftjax.dtypes import dtype_name
from ftjax.errors import ConfigError, LoadError
from ftjax.interop import gather
from ftjax.interop.safetensors_reader import SafetensorsFile
from ftjax.interop.safetensors_writer import TensorPlan, write_safetensors
from ftjax.interop.smollm2 import default_gguf_path
from ftjax.lora import LoRA, apply_lora, expert_lora_attr, expert_params, linears
from ftjax.models.registry import hf_tensor_name

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapters(model: nnx.Module) -> list[tuple[tuple[str, ...], LoRA]]:
    """(linear path, adapter) for every linear that carries a LoRA adapter."""
    return [(tuple(path.split(".")), linear.lora) for path, linear in linears(model) if linear.lora is not None]


def expert_adapters(model: nnx.Module) -> list[tuple[tuple[str, ...], LoRA]]:
    """(experts weight path `layers.mlp.experts.gate_up_proj`, adapter) for each adapted expert weight, in
    transformers' parameter order (gate_up_proj, then down_proj)."""
    found = [(tuple(path.split(".")), getattr(experts, expert_lora_attr(name)))
             for path, experts, name in expert_params(model)]
    return [(path, lora) for path, lora in found if lora is not None]


def expert_tensor_names(found: list[tuple[tuple[str, ...], LoRA]], layer: int) -> list[str]:
    """PEFT's tensor-name prefix of each expert adapter in `found` for one layer (nested wrappers: every
    weight but the last adapted one sits one `base_layer.` deeper per wrapper around it)."""
    names = []
    for i, (path, _) in enumerate(found):
        module = ".".join(["model", "layers", str(layer), *path[1:-1]])
        names.append(PREFIX + module + ".base_layer" * (len(found) - 1 - i))
    return names


def to_peft_expert(x: np.ndarray, which: str) -> np.ndarray:
    """ftjax's per-expert factor (A [E, in, r] or B [E, r, out]) -> PEFT's (A [E·r, in] or B [out, r·E])."""
    e, m, n = x.shape
    return x.transpose(0, 2, 1).reshape(e * n, m) if which == "lora_A" else x.transpose(2, 1, 0).reshape(n, m * e)


def from_peft_expert(x: np.ndarray, which: str, experts: int) -> np.ndarray:
    """The inverse of `to_peft_expert`."""
    if which == "lora_A":
        return x.reshape(experts, -1, x.shape[-1]).transpose(0, 2, 1)
    return x.reshape(x.shape[0], -1, experts).transpose(2, 1, 0)


def module_name(path: tuple[str, ...], layer: int | None) -> str:
    """The HF module name of a linear (`model.layers.3.self_attn.q_proj`)."""
    return hf_tensor_name(path + ("kernel",), layer)[0].removesuffix(".weight")


def _shared(found: list[tuple[tuple[str, ...], LoRA]], attr: str) -> Any:
    values = {getattr(lora, attr) for _, lora in found}
    if len(values) > 1:
        raise ConfigError(f"the adapters differ in {attr} ({sorted(values)}); one PEFT LoraConfig needs one value")
    return values.pop()


def base_reference(path_or_name: str | Path | None) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, gguf_file) that PEFT / transformers can load for a base: an HF folder's
    absolute path; for a GGUF file (the default model included) the folder holding it and the file name,
    to pass as `from_pretrained(folder, gguf_file=...)`. Anything else (a Hub id) is kept as given."""
    if path_or_name is None:
        return None, None
    if str(path_or_name) == DEFAULT_MODEL:
        path_or_name = default_gguf_path()
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.resolve().parent), path.name
    if path.is_dir():
        return str(path.resolve()), None
    return str(path_or_name), None


def adapter_config(model: nnx.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The LoraConfig PEFT needs to rebuild these adapters (targets by module name, as PEFT matches them)."""
    linear_found, experts_found = adapters(model), expert_adapters(model)
    found = linear_found + experts_found
    if not found:
        raise ConfigError("the model has no LoRA adapters to export (a full fine-tuning run exports with "
                          "--format=hf)")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": _shared(found, "rank"), "lora_alpha": _shared(found, "alpha"), "use_rslora": _shared(found, "rslora"),
        "lora_dropout": _shared(found, "dropout"), "target_modules": sorted({p[-1] for p, _ in linear_found}),
        "target_parameters": sorted(".".join(p[1:]) for p, _ in experts_found) or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def _plans(found: list[tuple[tuple[str, ...], LoRA]], num_layers: int, dtype: str | None) -> list[TensorPlan]:
    plans = []
    for path, lora in found:
        a, b = lora.lora_a[...], lora.lora_b[...]
        stacked = a.ndim == 3
        for layer in range(num_layers) if stacked else [None]:
            name = PREFIX + module_name(path, layer)
            for which, x in (("lora_A", a), ("lora_B", b)):
                dt = dtype or x.dtype.name
                shape = tuple(x.shape[-2:])[::-1]
                fetch = functools.partial(gather.tensor, x, layer, dt, True)
                plans.append(TensorPlan(f"{name}.{which}.weight", shape, np.dtype(dt), fetch))
    return sorted(plans, key=lambda t: t.name)


def _expert_factor(x: jax.Array, layer: int, dtype: str, which: str) -> np.ndarray:
    return to_peft_expert(gather.tensor(x, layer, dtype), which)


def _expert_plans(found: list[tuple[tuple[str, ...], LoRA]], num_layers: int, dtype: str | None) -> list[TensorPlan]:
    """The experts' factors in PEFT's ParamWrapper layout, one layer's [E, ., .] slice at a time."""
    plans = []
    for layer in range(num_layers):
        for (_, lora), name in zip(found, expert_tensor_names(found, layer)):
            for which, x in (("lora_A", lora.lora_a[...]), ("lora_B", lora.lora_b[...])):
                dt = dtype or x.dtype.name
                e, m, n = x.shape[-3:]
                shape = (e * n, m) if which == "lora_A" else (n, m * e)
                fetch = functools.partial(_expert_factor, x, layer, dt, which)
                plans.append(TensorPlan(f"{name}.{which}.weight", shape, np.dtype(dt), fetch))
    return plans


def export_peft(model: nnx.Module, out: str | Path, *, base_model_name_or_path: str | None = None,
                dtype: Any = None) -> Path:
    """Write the model's adapters as a PEFT folder that `PeftModel.from_pretrained(hf_base, out)` loads.

    `base_model_name_or_path` (an HF folder, a .gguf, ftjax's default-model name) is written as what PEFT can
    load: `AutoPeftModelForCausalLM.from_pretrained(out)` works for an HF-folder base; for a GGUF base the
    folder is recorded and the adapter's README.md gives the `gguf_file=` call."""
    base, gguf_file = base_reference(base_model_name_or_path)
    config = adapter_config(model, base)
    found = adapters(model)
    dt = dtype_name(dtype) if dtype is not None else None
    plans = _plans(found, model.config.num_layers, dt) + _expert_plans(expert_adapters(model), model.config.num_layers,
                                                                        dt)
    plans = sorted(plans, key=lambda t: t.name)
    out = Path(out)
    main = jax.process_index() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS, plans, write=main)
    if main:
        (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        (out / "README.md").write_text(_model_card(base, gguf_file))
    gather.barrier("ftjax_export_peft")
    return out


def _model_card(base: str | None, gguf_file: str | None) -> str:
    """How to load this adapter, written beside it (PEFT's adapter_config.json cannot name a GGUF file)."""
    if base is None:
        return "# LoRA adapter exported by ftjax\n\nLoad with `PeftModel.from_pretrained(base_model, this_folder)`.\n"
    if gguf_file is None:
        load = ("from peft import AutoPeftModelForCausalLM\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER)\n")
    else:
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r}, gguf_file={gguf_file!r})"
                "  # dequantized by transformers\n"
                "model = PeftModel.from_pretrained(base, ADAPTER)\n")
    where = base + (f" (GGUF file {gguf_file})" if gguf_file else "")
    return (f"# LoRA adapter exported by ftjax\n\nBase model: {where}\n\n```python\n"
            f"ADAPTER = \"path/to/this/folder\"\n{load}```\n")


def load_peft(model: nnx.Module, folder: str | Path, *, seed: int = 0) -> nnx.Module:
    """Attach the PEFT LoRA adapter in `folder` to a loaded base `model`, in place; returns the model."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise LoadError(f"{folder}: not a PEFT adapter folder (needs {CONFIG} and {WEIGHTS})")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LoadError(f"{folder / CONFIG}: only plain LoRA adapters (no DoRA, no per-module rank/alpha) load")
    targets = cfg["target_modules"] or []
    targets = targets.split(",") if isinstance(targets, str) else list(targets)
    targets += list(cfg.get("target_parameters") or [])  # the experts' (mlp.experts.gate_up_proj, ...)
    apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), targets=targets, dropout=float(cfg["lora_dropout"]),
               rslora=bool(cfg.get("use_rslora", False)), rngs=nnx.Rngs(seed))
    weights = SafetensorsFile(folder / WEIGHTS)
    names = set(weights.keys())
    for path, lora in adapters(model):
        for which, var in (("lora_A", lora.lora_a), ("lora_B", lora.lora_b)):
            stacked = var[...].ndim == 3
            layers = range(model.config.num_layers) if stacked else [None]
            parts = []
            for layer in layers:
                name = f"{PREFIX}{module_name(path, layer)}.{which}.weight"
                if name not in names:
                    raise LoadError(f"{folder / WEIGHTS}: tensor {name} is missing")
                parts.append(np.asarray(weights.array(name), np.float32).T)
            value = np.stack(parts) if stacked else parts[0]
            if value.shape != var[...].shape:
                raise LoadError(f"{folder / WEIGHTS}: {which} of {'.'.join(path)} stacks to {value.shape} "
                                f"in ftjax layout, expected {var[...].shape}")
            var[...] = jax.device_put(jnp.asarray(value, var[...].dtype), var[...].sharding)
    found = expert_adapters(model)
    layers = range(model.config.num_layers)
    prefixes = [expert_tensor_names(found, layer) for layer in layers]
    for i, (_, lora) in enumerate(found):
        for which, var in (("lora_A", lora.lora_a), ("lora_B", lora.lora_b)):
            parts = []
            for layer in layers:
                name = f"{prefixes[layer][i]}.{which}.weight"
                if name not in names:
                    raise LoadError(f"{folder / WEIGHTS}: tensor {name} is missing")
                parts.append(from_peft_expert(np.asarray(weights.array(name), np.float32), which, var[...].shape[1]))
            var[...] = jax.device_put(jnp.asarray(np.stack(parts), var[...].dtype), var[...].sharding)
    return model
