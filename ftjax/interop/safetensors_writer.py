"""Streaming safetensors writing: the header is planned from shapes, then tensors are written one at a time.

Knowing every tensor's shape and dtype up front lets the header (with its byte offsets) go first,
so a shard of many GB never sits in host memory: each tensor is fetched, written and dropped.
bfloat16 is written through ml_dtypes (safetensors' numpy backend cannot represent it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from ftjax.errors import ConfigError

_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name, final shape and dtype, and how to fetch it (called once, at write time)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (HF's max_shard_size spellings)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"max shard size {size!r}: use e.g. '5GB', '500MB' or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(tensors: Iterable[TensorPlan], max_bytes: int) -> list[list[TensorPlan]]:
    """Tensors in order, grouped into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def _header(tensors: list[TensorPlan], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        dt = np.dtype(t.dtype)
        if dt not in _CODES:
            raise ConfigError(f"tensor {t.name}: dtype {dt} cannot be written to safetensors")
        entries[t.name] = {"dtype": _CODES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes


def write_safetensors(path: str | os.PathLike, tensors: list[TensorPlan], metadata: dict[str, str] | None = None,
                      *, write: bool = True) -> None:
    """Write `tensors` to `path`, fetching each in turn; `write=False` fetches only (the other hosts of a
    multi-host export, which must take part in every gather but not write)."""
    if not write:
        for t in tensors:
            t.fetch()
        return
    header = _header(tensors, {"format": "pt", **(metadata or {})})
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for t in tensors:
            arr = np.ascontiguousarray(t.fetch(), dtype=t.dtype)
            if tuple(arr.shape) != tuple(t.shape):
                raise ValueError(f"tensor {t.name}: fetched shape {arr.shape}, planned {t.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # little-endian hosts (every JAX platform)
    os.replace(tmp, path)  # a half-written shard never carries the final name
