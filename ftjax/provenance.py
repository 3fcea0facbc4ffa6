"""What a run was trained on: the base model's identity and the data files' fingerprints.

Stored with every checkpoint; resuming on a different base or changed data is refused. The base
is identified by path, file sizes and a hash of each file's header (not the whole file, which
would take minutes for a 70B model).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

from ftjax.errors import ConfigError
from ftjax.interop.sources import resolve

HEADER_BYTES = 1 << 20  # GGUF metadata can be a few MB; the first MiB pins tokenizer + tensor table start


def _file_id(path: Path, header_bytes: int) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(header_bytes)
    return {"size": path.stat().st_size, "header_sha256": hashlib.sha256(head).hexdigest()}


def _safetensors_header_len(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def base_identity(path_or_name: str) -> dict[str, Any]:
    """{path, files: {name: {size, header_sha256}}} for the base model a run starts from."""
    kind, path = resolve(path_or_name)
    if kind == "tiny":
        return {"path": str(path_or_name), "files": {}}
    if kind == "gguf":
        return {"path": str(path), "files": {path.name: _file_id(path, HEADER_BYTES)}}
    files = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            files[f.name] = _file_id(f, _safetensors_header_len(f))
        elif f.name in ("config.json", "model.safetensors.index.json") or f.suffix == ".bin":
            files[f.name] = _file_id(f, HEADER_BYTES)
    return {"path": str(path), "files": files}


def check_same(recorded: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """One line naming the first difference between the recorded and the current provenance."""
    if recorded == current:
        return
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            raise ConfigError(f"cannot resume: the {what} changed since the checkpoint ({key}: recorded "
                              f"{_short(recorded.get(key))}, now {_short(current.get(key))}); use a new --workdir")


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) < 120 else s[:117] + "..."
