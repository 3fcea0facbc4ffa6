"""HF checkpoint folders -> ftjax models: config.json (both rope forms) and sharded safetensors.

Nothing here executes code from the folder: config.json is parsed as JSON (`auto_map` is
ignored) and pickled weights are refused unless torch's weights-only loader is available.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from jax.sharding import Mesh

from ftjax.errors import LoadError
from ftjax.interop.expert_layouts import ExpertLayouts
from ftjax.interop.quantized_base import FrozenQuant
from ftjax.interop.tensors import DictSource, SafetensorsFolder, TensorSource, load_params
from ftjax.models.registry import config_from_hf, text_config

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(folder: str | Path) -> dict:
    """config.json as a dict; a clear error when it is absent or not JSON."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise LoadError(f"{folder}: no config.json (not an HF model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def _reason(e: Exception) -> str:
    """The one informative line of torch's multi-paragraph unpickling error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line or "Unsupported global" in line:
            return line.split(" Please use")[0]
    return lines[0] if lines else type(e).__name__


def _torch_weights_only(folder: Path) -> TensorSource:
    """Pickled weights, read only with torch's weights-only unpickler (no arbitrary code)."""
    try:
        import torch
    except ImportError:
        raise LoadError(f"{folder}: only pickled pytorch_model.bin weights found; ftjax refuses pickles. "
                        "Convert them to safetensors, or install torch to read them weights-only") from None
    index = folder / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [PICKLED[0]]
    tensors = {}
    for fname in files:
        try:
            state = torch.load(folder / fname, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler refuses anything but tensors
            raise LoadError(f"{folder / fname}: refused by torch's weights-only loader ({_reason(e)})") from None
        tensors.update({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()})
    return DictSource(tensors, str(folder))


class LanguageModelSource:
    """The text tensors of a multimodal Gemma 3 folder under the plain causal-LM names: `model.X` is read
    from `language_model.model.X` (Hub layout) or `model.language_model.X` (transformers 5's module names)."""

    def __init__(self, inner: TensorSource):
        self.inner, self.where = inner, inner.where
        names = inner.names()
        self._map = {}
        for name in names:
            for prefix, plain in (("language_model.model.", "model."), ("model.language_model.", "model."),
                                  ("language_model.lm_head.", "lm_head.")):
                if name.startswith(prefix):
                    self._map[plain + name[len(prefix):]] = name
        self._map.update({n: n for n in names if n.startswith("lm_head.")})

    def names(self) -> set[str]:
        return set(self._map)

    def array(self, name: str) -> np.ndarray:
        return self.inner.array(self._map[name])


def tensor_source(folder: str | Path) -> TensorSource:
    """Safetensors when present; pickles only through the weights-only path."""
    folder = Path(folder)
    if list(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        return SafetensorsFolder(folder)
    if any((folder / p).exists() for p in PICKLED):
        return _torch_weights_only(folder)
    raise LoadError(f"{folder}: no *.safetensors weights found")


def load_hf(folder: str | Path, *, dtype: str = "float32", param_dtype: str | None = None, mesh: Mesh | None = None,
            rules: dict | None = None, quant: FrozenQuant | None = None, **overrides):
    """An HF folder as an ftjax model, each tensor read straight into its sharding on `mesh` (with `quant`,
    the kernels it selects quantized a layer at a time)."""
    folder = Path(folder)
    hf = read_config(folder)
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, source=str(folder / "config.json"))
    if overrides:
        cfg = cfg.replace(**overrides)
    source = tensor_source(folder)
    if text_config(hf)[1]:
        logging.getLogger(__name__).warning("%s: multimodal Gemma 3: its language model loaded, the vision tower "
                                            "ignored", folder)
        source = LanguageModelSource(source)
    if cfg.moe is not None:  # experts stored one tensor each or fused 3-D: both read as [E, in, out]
        source = ExpertLayouts(source, cfg.num_layers, cfg.moe.num_experts)
    return load_params(cfg, source, mesh, rules, quant=quant)
