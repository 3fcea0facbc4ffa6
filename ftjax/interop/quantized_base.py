"""The frozen base held quantized (QLoRA, `train.frozen_quant`): which kernels, read layer by layer.

A loader quantizes one layer's [in, out] slice at a time on the host (or, for a GGUF base, keeps the file's
own blocks) and places the quantized arrays in the shardings of the kernel they replace; the full-precision
stack of a quantized kernel never exists. The layers dequantize their slice inside the layer scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ftjax.errors import ConfigError, LoadError
from ftjax.interop.gather import to_host
from ftjax.lora import frozen_quant_kernels
from ftjax.quant import nf4
from ftjax.quant.weight import QuantizedParam, abstract_weight, gguf_weight, place, quantize_slices

SCHEMES = ("int8", "nf4", "gguf")  # gguf: the .gguf file's own blocks, as shipped


@dataclasses.dataclass(frozen=True)
class FrozenQuant:
    """How the frozen base is held: the scheme, the kernels it covers, what they dequantize to."""

    scheme: str  # int8 | nf4 | gguf
    targets: str | None  # LoRA target patterns whose kernels are quantized; None = every linear but the head
    dtype: str = "float32"  # the dtype dequantized kernels are computed in


def frozen_quant(scheme: str, scope: str, lora_targets: Any, dtype: str) -> FrozenQuant | None:
    """`train.frozen_quant` / `train.frozen_quant_scope` (over `lora.targets`, computed in `dtype`) as a
    FrozenQuant (None: a full-precision base)."""
    if scheme == "none":
        return None
    return FrozenQuant(scheme, None if scope == "all_linears" else lora_targets, dtype)


def kernel_paths(model: nnx.Module, quant: FrozenQuant) -> set[tuple[str, ...]]:
    """Param paths (as in nnx flat states, strings) of the kernels `quant` holds quantized."""
    return {tuple(path.split(".")) + ("kernel",) for path, _ in frozen_quant_kernels(model, quant.targets)}


def check_layout(scheme: str, shape: tuple, axes: tuple, mesh: Mesh | None, rules: dict | None, name: str) -> None:
    """Blocks that fit the kernel and the mesh, checked on shapes before anything is read (ConfigError)."""
    if scheme == "nf4" and shape[-2] % nf4.BLOCK:
        raise ConfigError(f"train.frozen_quant=nf4: {name} has a contraction size of {shape[-2]}, not a multiple "
                          f"of the {nf4.BLOCK}-value NF4 block; use frozen_quant=int8")
    if mesh is not None:
        abstract_weight(scheme, shape, axes).shardings(mesh, rules)  # ConfigError naming the split axis


def quantize_in_place(model: nnx.Module, quant: FrozenQuant, mesh: Mesh | None, rules: dict | None) -> nnx.Module:
    """Replace the selected kernels of a loaded model by quantized ones (each layer's slice on its own)."""
    if quant.scheme == "gguf":
        raise ConfigError("train.frozen_quant=gguf keeps a .gguf file's own blocks: set model.path to a .gguf file")
    selected = frozen_quant_kernels(model, quant.targets)
    for path, linear in selected:
        var = linear.kernel
        axes = var.get_metadata()["logical_axes"]
        check_layout(quant.scheme, var.get_value().shape, axes, mesh, rules, path)
    for path, linear in selected:
        var = linear.kernel
        kernel = to_host(var.get_value())
        weight = quantize_slices(kernel.reshape(-1, *kernel.shape[-2:]), kernel.shape[:-2], quant.scheme,
                                 var.get_metadata()["logical_axes"], quant.dtype)
        linear.kernel = QuantizedParam(place(weight, mesh, rules), **var.get_metadata())
    return model


def read_quantized(quant: FrozenQuant, var: nnx.Variable, tensors: list[tuple[str, bool]],
                   array: Callable[[str], Any], mesh: Mesh | None, rules: dict | None) -> QuantizedParam:
    """One kernel [*stack, in, out] from its per-layer source tensors (name, stored transposed), quantized a
    layer at a time, or for a GGUF base its layers' rows stacked as the file holds them."""
    shape, axes = tuple(var.shape), var.get_metadata()["logical_axes"]
    stack = shape[:-2]
    if quant.scheme == "gguf":
        parts = [array(name) for name, _ in tensors]
        kinds = {getattr(p, "qtype", None) for p in parts}
        if len(kinds) != 1 or None in kinds:
            raise LoadError(f"{tensors[0][0]}: its layers are stored as {', '.join(sorted(map(str, kinds)))}; "
                            "frozen_quant=gguf stacks one block type per weight (use frozen_quant=nf4 for this file)")
        qtype = kinds.pop()
        rows = np.stack([p.rows for p in parts]).reshape(*stack, *parts[0].rows.shape)
        weight = gguf_weight(rows, qtype, axes, quant.dtype)
    else:
        slices = (np.asarray(array(name)).T if transposed else np.asarray(array(name)) for name, transposed in tensors)
        weight = quantize_slices(slices, stack, quant.scheme, axes, quant.dtype)
    return QuantizedParam(place(weight, mesh, rules), **var.get_metadata())
