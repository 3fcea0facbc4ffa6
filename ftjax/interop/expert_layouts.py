"""Mixture-of-experts weights from either on-disk layout, served as one [E, in, out] tensor per layer.

Hub checkpoints hold one tensor per expert (Mixtral `block_sparse_moe.experts.N.w1/w3/w2`, Qwen3-MoE
`mlp.experts.N.gate_proj/up_proj/down_proj`, each [out, in]); transformers 5 can also write fused 3-D
`mlp.experts.gate_up_proj` [E, 2F, D] and `mlp.experts.down_proj` [E, D, F]. The registry names each
layer's experts `model.layers.I.mlp.experts.*.gate_proj` (and up_proj, down_proj); this view serves
those names lazily from whichever layout the folder has, reading only the experts a shard asks for.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ftjax.errors import LoadError

_STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.\*\.(gate_proj|up_proj|down_proj)$")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight$")
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hub_expert_name(model_type: str, layer: int, proj: str, expert: int) -> str:
    """The per-expert tensor name Hub checkpoints use (and transformers 5's save_pretrained writes), [out, in]."""
    if model_type == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL[proj]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def hub_router_name(model_type: str, layer: int) -> str:
    """The router's [E, D] tensor name in Hub checkpoints (Mixtral keeps its `block_sparse_moe` module name)."""
    module = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    return f"model.layers.{layer}.{module}.gate.weight"


class _PerExpert:
    """[E, in, out] over one [out, in] tensor per expert."""

    def __init__(self, source: Any, names: list[str]):
        self._source, self._names = source, names
        out_dim, in_dim = source.array(names[0]).shape
        self.shape = (len(names), in_dim, out_dim)

    def __getitem__(self, index: tuple) -> np.ndarray:
        experts, rows, cols = tuple(index) + (slice(None),) * (3 - len(index))
        picked = self._names[experts] if isinstance(experts, slice) else [self._names[experts]]
        return np.stack([np.asarray(self._source.array(n)[cols, rows]).T for n in picked])


class _Fused:
    """[E, in, out] over a fused [E, out·parts, in] tensor, taking output block `part` of `parts`."""

    def __init__(self, array: np.ndarray, part: int, parts: int):
        e, out_all, in_dim = array.shape
        self._array, self._offset = array, part * (out_all // parts)
        self.shape = (e, in_dim, out_all // parts)

    def __getitem__(self, index: tuple) -> np.ndarray:
        experts, rows, cols = tuple(index) + (slice(None),) * (3 - len(index))
        start, stop, step = cols.indices(self.shape[2])
        cols = slice(self._offset + start, self._offset + stop, step)
        return np.asarray(self._array[experts, cols, rows]).swapaxes(-1, -2)


class ExpertLayouts:
    """A TensorSource (wrapping one) that adds each layer's stacked expert names and router name; a
    layer whose experts are in neither layout fails with both layouts' names when it is read."""

    def __init__(self, source: Any, num_layers: int, num_experts: int):
        self._source, self._experts = source, num_experts
        self.where = source.where
        self._names = source.names()
        self._virtual = {f"model.layers.{i}.{n}" for i in range(num_layers)
                         for n in ("mlp.gate.weight", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj",
                                   "mlp.experts.*.down_proj")}

    def names(self) -> set[str]:
        return self._names | self._virtual

    def array(self, name: str):
        stacked, router = _STACKED.match(name), _ROUTER.match(name)
        if stacked:
            return self._stacked(int(stacked.group(1)), stacked.group(2))
        if router and name not in self._names:
            mixtral = f"model.layers.{router.group(1)}.block_sparse_moe.gate.weight"
            if mixtral not in self._names:
                raise LoadError(f"{self.where}: tensor {name} (or {mixtral}) is missing")
            return self._source.array(mixtral)
        return self._source.array(name)

    def _stacked(self, layer: int, proj: str):
        p = f"model.layers.{layer}"
        fused = f"{p}.mlp.experts.gate_up_proj" if proj != "down_proj" else f"{p}.mlp.experts.down_proj"
        if fused in self._names:
            array = self._source.array(fused)
            return _Fused(array, 1 if proj == "up_proj" else 0, 1 if proj == "down_proj" else 2)
        for pattern in (f"{p}.mlp.experts.{{}}.{proj}.weight",
                        f"{p}.block_sparse_moe.experts.{{}}.{_MIXTRAL[proj]}.weight"):
            names = [pattern.format(e) for e in range(self._experts)]
            present = [n in self._names for n in names]
            if all(present):
                return _PerExpert(self._source, names)
            if any(present):
                missing = names[present.index(False)]
                raise LoadError(f"{self.where}: tensor {missing} is missing")
        raise LoadError(f"{self.where}: layer {layer} has no {proj} experts in either layout "
                        f"(looked for {fused} and {p}.mlp.experts.N.{proj}.weight / "
                        f"{p}.block_sparse_moe.experts.N.{_MIXTRAL[proj]}.weight)")
