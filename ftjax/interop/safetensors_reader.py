"""Memory-mapped safetensors reading: any slice of any tensor (bf16 included), without torch.

safetensors' own numpy backend cannot represent bfloat16; the format is simple enough that a
read-only memmap plus ml_dtypes gives exact, lazy, per-shard reads.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ftjax.errors import LoadError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    """One .safetensors file: header parsed at open, tensors mapped lazily as numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LoadError(f"{self.path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise LoadError(f"{self.path}: truncated or not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise LoadError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._base = 8 + n
        self._file_size = size
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        """A zero-copy read-only view of the tensor; slicing it reads only those bytes."""
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise LoadError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if self._base + end > self._file_size or end - start != dtype.itemsize * int(np.prod(shape)):
            raise LoadError(f"{self.path}: tensor {name} is truncated (file has {self._file_size} bytes, "
                            f"tensor ends at {self._base + end})")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[self._base + start:self._base + end].view(dtype).reshape(shape)
