"""Tensor sources by HF name (safetensors folders, in-memory dicts) and the sharded param loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ftjax.errors import LoadError
from ftjax.interop.quantized_base import FrozenQuant, check_layout, kernel_paths, read_quantized
from ftjax.interop.safetensors_reader import SafetensorsFile
from ftjax.models.llama import ModelConfig
from ftjax.models.registry import MODEL_CLASSES, hf_tensor_name, is_stacked
from ftjax.sharding import splits, state_shardings


class TensorSource(Protocol):
    """Read access to HF-named tensors; `array` returns something numpy-sliceable."""

    where: str

    def names(self) -> set[str]: ...

    def array(self, name: str) -> np.ndarray: ...


class SafetensorsFolder:
    """All `*.safetensors` of an HF folder, routed by `model.safetensors.index.json` when present."""

    def __init__(self, folder: Path):
        self.where = str(folder)
        index = folder / "model.safetensors.index.json"
        self._files: dict[str, SafetensorsFile] = {}
        self._owner: dict[str, str] = {}
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fname in weight_map.items():
                if not (folder / fname).exists():
                    raise LoadError(f"{index}: shard {fname} (holding {name}) is missing")
                self._owner[name] = fname
        else:
            for f in sorted(folder.glob("*.safetensors")):
                for name in self._file(folder, f.name).keys():
                    self._owner[name] = f.name
        self._folder = folder

    def _file(self, folder: Path, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(folder / fname)
        return self._files[fname]

    def names(self) -> set[str]:
        return set(self._owner)

    def array(self, name: str) -> np.ndarray:
        f = self._file(self._folder, self._owner[name])
        if name not in f.header:
            raise LoadError(f"{f.path}: tensor {name} listed in the index is not in the file")
        return f.array(name)


class DictSource:
    """Tensors already in memory (dequantized GGUF, torch weights-only load)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], where: str):
        self._tensors, self.where = tensors, where

    def names(self) -> set[str]:
        return set(self._tensors)

    def array(self, name: str) -> np.ndarray:
        return self._tensors[name]


def _expected_hf_shape(path, shape) -> list[tuple[str, tuple, bool]]:
    """Every HF tensor a param needs, with the shape it must have."""
    if is_stacked(path):
        per_layer = tuple(shape[1:])
        out = []
        for i in range(shape[0]):
            name, t = hf_tensor_name(path, i)
            out.append((name, per_layer[::-1] if t else per_layer, t))
        return out
    name, t = hf_tensor_name(path)
    return [(name, tuple(shape)[::-1] if t else tuple(shape), t)]


def _reader(source: TensorSource, path: tuple, shape: tuple, dtype):
    """A make_array_from_callback callback: reads just the requested shard from the source."""

    def one(name: str, transpose: bool, index: tuple) -> np.ndarray:
        arr = source.array(name)
        if transpose:
            return np.asarray(arr[index[1], index[0]]).T
        return np.asarray(arr[index])

    def cb(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if is_stacked(path):
            layers = range(*index[0].indices(shape[0]))
            parts = [one(*hf_tensor_name(path, i), index[1:]) for i in layers]
            return np.stack(parts).astype(dtype)
        return one(*hf_tensor_name(path), index).astype(dtype)

    return cb


def quantized_tensor_names(cfg: ModelConfig, quant: FrozenQuant) -> set[str]:
    """The source tensor names (every layer's) of the kernels `quant` holds quantized."""
    abstract = nnx.eval_shape(lambda: MODEL_CLASSES[cfg.model_type](cfg, rngs=nnx.Rngs(0)))
    paths = kernel_paths(abstract, quant)
    return {name for path, var in nnx.to_flat_state(nnx.state(abstract)) if tuple(map(str, path)) in paths
            for name, _, _ in _expected_hf_shape(path, var.shape)}


def load_params(cfg: ModelConfig, source: TensorSource, mesh: Mesh | None = None, rules: dict | None = None,
                quant: FrozenQuant | None = None):
    """Build the model with every parameter read shard by shard straight into its target sharding.

    Shapes are checked against the source first, so a missing or mis-shaped tensor fails
    before anything is read; each device (each host) reads only the slices it holds. With `quant`, the
    kernels it selects are read a layer at a time and held quantized (ftjax.interop.quantized_base).
    """
    model_cls = MODEL_CLASSES[cfg.model_type]
    cfg = cfg.replace(fuse_qkv=cfg.fuse_qkv and not splits(mesh, rules, "heads", "kv"))
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    quantized = kernel_paths(abstract, quant) if quant is not None else set()
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    available = source.names()
    for path, var in flat:
        for name, want, _ in _expected_hf_shape(path, var.shape):
            if name not in available:
                raise LoadError(f"{source.where}: tensor {name} is missing")
            got = tuple(source.array(name).shape)
            if got != want:
                raise LoadError(f"{source.where}: tensor {name} has shape {got}, expected {want}")
    for path, var in flat:
        if tuple(map(str, path)) in quantized:
            name = _expected_hf_shape(path, var.shape)[0][0]
            scheme = getattr(source.array(name), "qtype", quant.scheme) if quant.scheme == "gguf" else quant.scheme
            check_layout(scheme, tuple(var.shape), var.get_metadata()["logical_axes"], mesh, rules, name)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
    loaded = []
    for path, var in flat:
        if tuple(map(str, path)) in quantized:
            tensors = [(name, t) for name, _, t in _expected_hf_shape(path, var.shape)]
            loaded.append((path, read_quantized(quant, var, tensors, source.array, mesh, rules)))
            continue
        sharding = shardings[path] if mesh is not None else SingleDeviceSharding(jax.local_devices()[0])
        arr = jax.make_array_from_callback(var.shape, sharding, _reader(source, path, var.shape, var.dtype))
        loaded.append((path, var.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
