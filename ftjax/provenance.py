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
    if kind == "workdir":  # a run started from another run (SFT, then DPO): its config and checkpoint files
        files = [path / "config.json", *sorted(f for f in (path / "checkpoints").rglob("*") if f.is_file())]
        return {"path": str(path), "files": {str(f.relative_to(path)): _file_id(f, HEADER_BYTES) for f in files}}
    files = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            files[f.name] = _file_id(f, _safetensors_header_len(f))
        elif f.name in ("config.json", "model.safetensors.index.json") or f.suffix == ".bin":
            files[f.name] = _file_id(f, HEADER_BYTES)
    return {"path": str(path), "files": files}


def check_same(recorded: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """One line naming, in words, the first difference between the recorded and the current provenance."""
    if recorded == current:
        return
    key, was, now = _first_difference(recorded, current)
    raise ConfigError(f"cannot resume: the {what} changed since the checkpoint: {key} {_change(was, now)}; "
                      "start a new run with --workdir=NEW")


# Keys a resumed run may change: how long it runs, how it logs, evaluates and saves, where it runs.
# Every other key, including keys added to the config later, must equal the recorded run's.
MAY_CHANGE_ON_RESUME = ("train.steps", "train.log_every", "eval.*", "checkpoint.*", "mesh.data", "mesh.fsdp",
                        "mesh.tensor", "mesh.expert", "data.prefetch", "model.path")  # model.path: the base's content is checked


def check_resume_config(recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a resume whose config differs from the recorded run's outside MAY_CHANGE_ON_RESUME, in one
    line naming the key and both values. A key the recorded run predates counts as its default value."""
    was, now, default = _flat(recorded), _flat(current), _flat(defaults)
    for key in sorted(set(was) | set(now)):
        if _may_change(key):
            continue
        old = was.get(key, default.get(key, _ABSENT))
        new = now.get(key, _ABSENT)
        if old != new:
            raise ConfigError(f"cannot resume: {key} was {_value(old)} in this workdir's run, now {_value(new)} "
                              f"(a resume may change only {', '.join(MAY_CHANGE_ON_RESUME)}); start a new run "
                              "with --workdir=NEW, or resume with the recorded value")


class _Absent:
    def __repr__(self) -> str:
        return "not set"


_ABSENT = _Absent()


def _may_change(key: str) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in MAY_CHANGE_ON_RESUME)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _first_difference(recorded: Any, current: Any, path: str = "") -> tuple[str, Any, Any]:
    """(dotted key, recorded, current) of the first differing leaf; a fingerprint {size, sha256} is a leaf."""
    if isinstance(recorded, dict) and isinstance(current, dict) and not _is_fingerprint(recorded):
        for key in sorted(set(recorded) | set(current), key=str):
            if recorded.get(key, _ABSENT) != current.get(key, _ABSENT):
                return _first_difference(recorded.get(key, _ABSENT), current.get(key, _ABSENT),
                                         f"{path}.{key}" if path else str(key))
    return path, recorded, current


def _is_fingerprint(d: dict) -> bool:
    return "sha256" in d or "header_sha256" in d


def _describe(v: Any) -> str:
    if v is _ABSENT or v is None:
        return "absent"
    if isinstance(v, dict) and _is_fingerprint(v):
        digest = v.get("sha256", v.get("header_sha256", ""))
        return f"{v.get('size', 0):,} bytes (sha256 {digest[:12]}…)"
    return _value(v)


def _change(was: Any, now: Any) -> str:
    if was is _ABSENT or was is None:
        return f"is new ({_describe(now)})"
    if now is _ABSENT or now is None:
        return f"is no longer there (was {_describe(was)})"
    return f"was {_describe(was)}, now {_describe(now)}"


def _value(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) < 120 else s[:117] + "..."
