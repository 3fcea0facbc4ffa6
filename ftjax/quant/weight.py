"""QuantizedWeight: a frozen kernel [*stack, in, out] held quantized, with its logical axes.

A pytree (its arrays are the leaves; scheme, logical shape, axes and dtype are static), held in
the model by a `QuantizedParam` variable. NF4 and int8 leaves are laid out like the kernel [in, out]
they replace; GGUF codes keep the file's [out, blocks, bytes]. Each leaf names its logical axes,
so the one rules table that shards the kernel shards them too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ftjax.errors import ConfigError
from ftjax.quant import gguf_blocks, int8, nf4
from ftjax.sharding import spec_for

SCHEMES = ("int8", "nf4")  # what quantize_weight makes; GGUF block types come as shipped (gguf_weight)
# contraction-axis block of each scheme (int8 scales whole channels: any split keeps them whole)
BLOCK = {"int8": 1, "nf4": nf4.BLOCK, **{t: b for t, (b, _) in gguf_blocks.BLOCKS.items()}}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Quantized arrays of one kernel (stacked over layers where the kernel is), and how to read them."""

    arrays: dict[str, jax.Array]
    scheme: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})  # the kernel's [*stack, in, out] as stored
    axes: tuple[str | None, ...] = dataclasses.field(metadata={"static": True})  # the kernel's logical axes
    dtype: str = dataclasses.field(metadata={"static": True}, default="float32")  # what dequantize returns

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and every level of scales); also for an abstract_weight."""
        return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in self.arrays.values()))

    def dequantize(self) -> jax.Array:
        """The kernel [*stack, in, out] in `dtype` (jit-able; inside a layer scan: one layer's slice)."""
        fn = _DEQUANTIZE.get(self.scheme) or functools.partial(_dequantize_gguf, qtype=self.scheme)
        for _ in range(self.arrays["codes"].ndim - _LAYER_RANK.get(self.scheme, 3)):  # stacked layers
            fn = jax.vmap(fn)
        return fn(self.arrays).astype(self.dtype)

    def leaf_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Logical axes of each array: codes and block scales like the kernel; double-quant scales unsharded."""
        *lead, ax_in, ax_out = self.axes
        lead = tuple(lead)
        if self.scheme == "int8":
            return {"codes": self.axes, "scales": lead + (ax_out,)}
        if self.scheme in gguf_blocks.BLOCKS:
            return {"codes": lead + (ax_out, ax_in, None)}
        return {"codes": self.axes, "absmax_codes": self.axes, "absmax_scales": lead + (None,), "offset": lead}

    def shardings(self, mesh: Mesh, rules: dict | None = None) -> QuantizedWeight:
        """NamedSharding per array; a mesh that would cut a quantization block in two is a ConfigError."""
        block, ax_in, n_in = BLOCK[self.scheme], self.axes[-2], self.shape[-2]
        spec = spec_for(self.axes, self.shape, mesh, rules)[len(self.shape) - 2]
        parts = int(np.prod([mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ())]))
        if (n_in // block) % parts:
            raise ConfigError(f"{self.scheme}: sharding logical axis '{ax_in}' ({n_in}) {parts} ways over mesh "
                              f"axes {spec} would split its {block}-value blocks; use a mesh that divides "
                              f"{n_in // block} blocks")
        axes = self.leaf_axes()
        specs = {k: NamedSharding(mesh, spec_for(axes[k], a.shape, mesh, rules)) for k, a in self.arrays.items()}
        return dataclasses.replace(self, arrays=specs)


class QuantizedParam(nnx.Param):
    """A frozen parameter whose value is a QuantizedWeight (a Param, so frozen filters keep it)."""


def _dequantize_nf4(arrays: dict[str, jax.Array]) -> jax.Array:
    return nf4.dequantize_nf4(nf4.NF4Blocks(**arrays))


def _dequantize_int8(arrays: dict[str, jax.Array]) -> jax.Array:
    return int8.dequantize_int8(int8.Int8Channels(**arrays))


def _dequantize_gguf(arrays: dict[str, jax.Array], qtype: str) -> jax.Array:
    return gguf_blocks.dequantize_blocks(arrays["codes"], qtype).T


_DEQUANTIZE = {"nf4": _dequantize_nf4, "int8": _dequantize_int8}
_LAYER_RANK = {"nf4": 2, "int8": 2}  # rank of one layer's codes (GGUF: [out, blocks, bytes] = 3)
_QUANTIZE = {"nf4": nf4.quantize_nf4, "int8": int8.quantize_int8}


def quantize_weight(kernel: Any, scheme: str, axes: tuple[str | None, ...], dtype: Any = None) -> QuantizedWeight:
    """Quantize a kernel [*stack, in, out] (host numpy; each [in, out] slice on its own, as bitsandbytes
    quantizes each linear) into a QuantizedWeight that dequantizes to `dtype` (default: the kernel's)."""
    kernel = np.asarray(jax.device_get(kernel))
    if kernel.ndim < 2 or len(axes) != kernel.ndim:
        raise ConfigError(f"a kernel [*stack, in, out] with one logical axis per dim is needed, "
                          f"got shape {kernel.shape} and axes {axes}")
    dtype = dtype if dtype is not None else kernel.dtype
    flat = kernel.reshape(-1, *kernel.shape[-2:])
    return quantize_slices(flat, kernel.shape[:-2], scheme, axes, dtype)


def quantize_slices(slices: Iterable[np.ndarray], stack: tuple[int, ...], scheme: str,
                    axes: tuple[str | None, ...], dtype: Any = "float32") -> QuantizedWeight:
    """A stacked kernel quantized one [in, out] slice at a time (a loader reads and quantizes layer by layer,
    so the full-precision stack never exists): `slices` in row-major order over `stack`."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    parts = [_QUANTIZE[scheme](np.asarray(k, np.float32))._asdict() for k in slices]
    stack = tuple(stack)
    arrays = {name: np.stack([p[name] for p in parts]).reshape(stack + np.shape(parts[0][name])) for name in parts[0]}
    n_in, n_out = (2 * arrays["codes"].shape[-2], arrays["codes"].shape[-1]) if scheme == "nf4" else \
        arrays["codes"].shape[-2:]
    return QuantizedWeight(arrays, scheme, (*stack, n_in, n_out), tuple(axes), jnp.dtype(dtype).name)


def place(weight: QuantizedWeight, mesh: Mesh | None, rules: dict | None = None) -> QuantizedWeight:
    """Host arrays -> device arrays in the shardings of the kernel they replace (one device without a mesh);
    every process passes the same host values and keeps only its shards."""
    if mesh is None:
        device = jax.local_devices()[0]
        return dataclasses.replace(weight, arrays={k: jax.device_put(np.asarray(a), device)
                                                   for k, a in weight.arrays.items()})
    shardings = weight.shardings(mesh, rules).arrays
    arrays = {}
    for k, a in weight.arrays.items():
        host = np.asarray(a)
        arrays[k] = jax.make_array_from_callback(host.shape, shardings[k], lambda index, h=host: h[index])
    return dataclasses.replace(weight, arrays=arrays)


def gguf_weight(rows: Any, qtype: str, axes: tuple[str | None, ...], dtype: Any = "float32") -> QuantizedWeight:
    """A GGUF tensor kept in its own blocks: rows uint8 [*stack, out, bytes per row], as the file stores
    an [out, in] weight (llama q/k rows already put back in HF order by the caller)."""
    if qtype not in gguf_blocks.BLOCKS:
        raise ConfigError(f"ggml type {qtype} cannot stay quantized (supported: {', '.join(gguf_blocks.BLOCKS)})")
    rows = np.asarray(rows, np.uint8)
    block, size = gguf_blocks.BLOCKS[qtype]
    if rows.ndim < 2 or rows.shape[-1] % size or len(axes) != rows.ndim:
        raise ConfigError(f"{qtype}: rows [*stack, out, k*{size}] with one logical axis per kernel dim are needed, "
                          f"got shape {rows.shape} and axes {axes}")
    n_blocks = rows.shape[-1] // size
    codes = rows.reshape(*rows.shape[:-1], n_blocks, size)  # host bytes; `place` puts them on devices
    shape = (*rows.shape[:-2], n_blocks * block, rows.shape[-2])
    return QuantizedWeight({"codes": codes}, qtype, shape, tuple(axes), jnp.dtype(dtype).name)


def leaf_shapes(scheme: str, shape: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every array a kernel [*stack, in, out] is held in, computed without quantizing."""
    *stack, n_in, n_out = shape
    stack = tuple(stack)
    if scheme == "int8":
        return {"codes": jax.ShapeDtypeStruct((*stack, n_in, n_out), jnp.int8),
                "scales": jax.ShapeDtypeStruct((*stack, n_out), jnp.float32)}
    if scheme == "nf4":
        blocks = n_in // nf4.BLOCK
        return {"codes": jax.ShapeDtypeStruct((*stack, n_in // 2, n_out), jnp.uint8),
                "absmax_codes": jax.ShapeDtypeStruct((*stack, blocks, n_out), jnp.uint8),
                "absmax_scales": jax.ShapeDtypeStruct((*stack, -(-blocks * n_out // nf4.SCALE_BLOCK)), jnp.float32),
                "offset": jax.ShapeDtypeStruct(stack, jnp.float32)}
    block, size = gguf_blocks.BLOCKS[scheme]
    return {"codes": jax.ShapeDtypeStruct((*stack, n_out, n_in // block, size), jnp.uint8)}


def abstract_weight(scheme: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
                    dtype: Any = "float32") -> QuantizedWeight:
    """A QuantizedWeight of ShapeDtypeStructs: for compiling (and sizing) a step from shapes alone."""
    return QuantizedWeight(leaf_shapes(scheme, tuple(shape)), scheme, tuple(shape), tuple(axes), jnp.dtype(dtype).name)
