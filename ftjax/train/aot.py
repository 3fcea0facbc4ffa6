"""A run's train step compiled ahead of time for a device topology (a TPU slice from a CPU host): what XLA says one
chip holds and computes, beside ftjax's own estimate and FLOP formula, and a roofline step time (an estimate).

This is how a pod configuration is checked before the pod is rented (MaxText's train_compile.py does the same).
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from ftjax import config as config_lib
from ftjax.config import recipe_module
from ftjax.errors import ConfigError, LoadError
from ftjax.interop.sources import pretrained_config
from ftjax.metrics.flops import attention_flops_per_token, matmul_params
from ftjax.models.llama import ModelConfig
from ftjax.models.registry import config_from_hf
from ftjax.platform import GIB, chip, device_capacity, device_kind, platform_of, topology_devices
from ftjax.train.compiled_memory import compiled_step, step_bytes
from ftjax.train.compose import ModelPart, Run, compose
from ftjax.train.memory import abstract_model, check_fits, estimate, on_platform

MOSAIC_CALL = "tpu_custom_call"  # the custom call a compiled Pallas TPU (Mosaic) kernel becomes


def model_shape(model: ModelPart, recipe: str | Path | None = None) -> ModelConfig:
    """The shape of the run's model (`model`: its model part) without its weights: from model.path when it is a
    readable model (an HF folder, a GGUF file, a known name), else from the recipe file's HF_CONFIG (the HF
    config.json values it quotes)."""
    try:
        return pretrained_config(model.path, model.dtype)
    except (LoadError, OSError):
        pass
    hf = getattr(recipe_module(recipe), "HF_CONFIG", None) if recipe else None
    if hf is None:
        raise ConfigError(f"config.model.path={model.path!r} is not a readable model and the recipe has no "
                          "HF_CONFIG: point model.path at the model's folder (its config.json is enough)")
    return config_from_hf(hf, dtype=model.dtype, source=f"{recipe}: HF_CONFIG")


def attention_kernel(name: str, platform: str, hlo: str) -> str:
    """What the compiled program runs for attention (`name`: model.attention), read from its HLO (a kernel that
    fell back is named so)."""
    if name == "splash":
        if MOSAIC_CALL in hlo:
            return "splash (mosaic)"
        return "splash (interpret)" if platform != "tpu" else "xla (splash fell back)"
    return name


def versions() -> dict[str, str | None]:
    """jax, jaxlib and libtpu versions (None: not installed)."""

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"jax": jax.__version__, "jaxlib": version("jaxlib"), "libtpu": version("libtpu")}


def recompute_flops_per_token(model_cfg: ModelConfig, seq_len: int, remat: str) -> float:
    """Forward FLOPs a remat policy runs again in the backward pass: `full` the whole forward (2 per matmul weight
    and the attention's forward third), `minimal`/`dots` the attention, `none` nothing."""
    attention = attention_flops_per_token(model_cfg, seq_len) / 3
    return {"full": 2.0 * matmul_params(model_cfg) + attention, "none": 0.0}.get(remat, attention)


def roofline(flops: float, bytes_accessed: float, tokens: int, formula_flops: float, devices: int,
             where: Any) -> dict[str, Any] | None:
    """Per chip: the larger of compute time (`flops` per chip over the peak) and memory time (XLA's bytes accessed
    over HBM bandwidth), and the tokens/s and MFU (the formula's FLOPs) that step time would give. An estimate: no
    communication, no overlap, and XLA counts a loop body's bytes once (a lower bound)."""
    spec = chip(where)
    if spec is None:
        return None
    compute_s, memory_s = flops / spec.peak_flops, bytes_accessed / spec.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    return {"label": "estimate (roofline, not a measurement)", "compute_s": compute_s, "memory_s": memory_s,
            "step_s": step_s, "bound": "compute" if compute_s >= memory_s else "memory",
            "tokens_per_s": tokens / step_s, "mfu": formula_flops / (step_s * devices * spec.peak_flops),
            "peak_flops_per_chip": spec.peak_flops, "hbm_bandwidth": spec.hbm_bandwidth, "source": spec.source}


def compile_report(run: Run, model_cfg: ModelConfig, topology: str, hlo_path: str | Path | None = None
                   ) -> dict[str, Any]:
    """Compile the composed run's step for its mesh and describe it: XLA's bytes and FLOPs per device, the chip's
    HBM, whether it fits, ftjax's estimate and FLOP formula beside them, the roofline estimate."""
    mesh, m, s = run.mesh, run.model, run.schedule
    platform = platform_of(mesh)
    model_cfg = on_platform(model_cfg, platform)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a compile-only executable cannot be cached
    try:
        start = time.perf_counter()
        compiled = compiled_step(run, model_cfg)
        compile_s = time.perf_counter() - start
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    hlo = compiled.as_text()
    if hlo_path is not None:
        Path(hlo_path).write_text(hlo)
    parts = step_bytes(compiled)
    capacity, capacity_source = device_capacity(mesh)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
    flops_device, bytes_device = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    tokens = s.batch_size * s.seq_len
    trainable = abstract_model_trainable(run, model_cfg)
    formula = run.method.flops_per_token(model_cfg, s.seq_len, trainable) * tokens
    executed = formula + recompute_flops_per_token(model_cfg, s.seq_len, m.remat) * tokens
    estimated = estimate(run, model_cfg)
    return {
        "topology": topology, "devices": mesh.size, "device_kind": device_kind(mesh), "platform": platform,
        "mesh": dict(mesh.shape),
        "bytes_per_device": parts["total"],
        "bytes_per_device_parts": {k: v for k, v in parts.items() if k != "total"},
        "hbm_bytes_per_device": capacity, "hbm_source": capacity_source,
        "fits": parts["total"] <= capacity,
        "estimate_bytes_per_device": sum(estimated.values()),
        "estimate_parts": estimated,
        "flops_per_step": flops_device * mesh.size,
        "flops_per_device": flops_device,
        "flops_source": "XLA cost analysis of the compiled program, per device times devices; it counts a loop body "
                        "once (the layers' scan, loss chunks, micro-batches), so it is a lower bound",
        "bytes_accessed_per_device": bytes_device,
        "formula_flops_per_step": formula,
        "formula_source": "the method's flops_per_token (ftjax/metrics/flops.py) x tokens per step (no remat recompute)",
        "executed_flops_per_step": executed,
        "executed_source": "the formula plus the forward FLOPs model.remat recomputes",
        "attention_kernel": attention_kernel(m.attention, platform, hlo),
        "mosaic_calls": hlo.count(f'custom_call_target="{MOSAIC_CALL}"'),
        "compile_s": compile_s,
        "versions": versions(),
        "roofline": roofline(max(flops_device, executed / mesh.size), bytes_device, tokens, formula, mesh.size, mesh),
        "config": {"method": run.method.name, "model.path": m.path, "model.attention": m.attention,
                   "model.dtype": m.dtype, "model.remat": m.remat, "train.frozen_dtype": m.frozen_dtype,
                   "train.frozen_quant": m.quant.scheme if m.quant is not None else "none",
                   "train.batch_size": s.batch_size, "train.grad_accum": s.grad_accum, "data.seq_len": s.seq_len,
                   "moe.implementation": model_cfg.moe.implementation if model_cfg.moe is not None else None},
    }


def abstract_model_trainable(run: Run, model_cfg: ModelConfig):
    """The run's trainable state from shapes (the adapters, for LoRA): what the FLOP formula counts."""
    return nnx.split(abstract_model(run.method, run.model, model_cfg), run.method.trainable, ...)[1]


def compile_recipe(config, recipe: str | Path | None, topology: str, out: str | Path, hlo_path=None,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """scripts/compile.py: `config` composed once over `topology`'s devices (its `auto` keys resolved for the
    slice, not this host) and compiled for them, the report written to `out`; ConfigError (one line) when the
    estimate or XLA's count exceeds the chip's HBM."""
    devices = topology_devices(topology)
    run = compose(config, devices)
    model_cfg = model_shape(run.model, recipe)
    config_lib.validate_for_model(config, model_cfg)
    say(f"{topology}: {len(devices)} x {device_kind(devices)}, mesh {dict(run.mesh.shape)}")
    say(check_fits(run, model_cfg))  # an oversize run stops here, before compiling
    say("compiling the train step (minutes for a billion-parameter model)...")
    report = compile_report(run, model_cfg, topology, hlo_path)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    total, hbm, roof = report["bytes_per_device"], report["hbm_bytes_per_device"], report["roofline"]
    say(f"XLA: {total / GIB:.2f} GiB per chip of {hbm / GIB:.1f} GiB HBM (estimate "
        f"{report['estimate_bytes_per_device'] / GIB:.2f} GiB); attention {report['attention_kernel']}; "
        f"{report['flops_per_step'] / 1e12:.1f} TFLOP/step; compile {report['compile_s']:.0f} s -> {out}")
    if roof is not None:
        say(f"roofline estimate: {roof['step_s']:.3f} s/step ({roof['bound']}-bound), "
            f"{roof['tokens_per_s']:,.0f} tokens/s, MFU {roof['mfu']:.1%}")
    if not report["fits"]:
        raise ConfigError(f"XLA's compiled step needs {total / GIB:.2f} GiB per chip, more than the "
                          f"{hbm / GIB:.1f} GiB HBM of {report['device_kind']}: use model.remat=full, a larger "
                          "mesh.fsdp (a larger slice), train.grad_accum or a smaller train.batch_size")
    return report
