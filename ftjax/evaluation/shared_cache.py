"""Base-model results shared across workdirs in $FTJAX_CACHE (default ~/.cache/ftjax; "off" disables it).

Base and few-shot task scores and the base's replies depend on the base model, the eval data and the
decoding settings, not on the run: a second run on the same base and data reuses them instead of
regenerating minutes of replies. Entries are keyed by their full identity: the base's content hash
(every weight file's bytes, not its path or header), dtypes, the data files' content hashes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ftjax.config import DEFAULT_MODEL
from ftjax.data.fingerprint import digest_key, file_fingerprint
from ftjax.evaluation.report import write_atomic
from ftjax.interop.smollm2 import default_gguf_path

_HASHES = "content_hashes.json"
_MODEL_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json", ".model", ".txt", ".jinja")


def cache_root() -> Path | None:
    """The shared cache folder, or None when FTJAX_CACHE is "off" / "0" / empty."""
    value = os.environ.get("FTJAX_CACHE")
    if value is None:
        return Path.home() / ".cache" / "ftjax"
    return None if value.strip().lower() in ("", "0", "off", "none") else Path(value).expanduser()


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, memoized per (path, size, mtime) in the cache (hashing 16 GB takes a minute)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    root = cache_root()
    memo_path = root / _HASHES if root is not None else None
    memo = _read_json(memo_path) if memo_path is not None else {}
    if memo_key in memo:
        return memo[memo_key]
    digest = file_fingerprint(str(path))["sha256"]
    if memo_path is not None:
        memo = _read_json(memo_path)  # re-read: another process may have added entries meanwhile
        memo[memo_key] = digest
        _write_json(memo_path, memo)
    return digest


def base_content_id(model_path: str, dtypes: dict[str, Any]) -> dict[str, Any]:
    """The base model's identity by content: its weight/config/tokenizer files' hashes, plus dtypes."""
    if str(model_path) == DEFAULT_MODEL:
        model_path = str(default_gguf_path())
    path = Path(model_path).expanduser()
    if path.is_file():
        files = {path.name: content_hash(path)}
    elif (path / "checkpoints").is_dir():  # a training workdir as the base (SFT, then DPO): its trained weights
        found = [path / "config.json", *(f for f in (path / "checkpoints").rglob("*") if f.is_file())]
        files = {str(f.relative_to(path)): content_hash(f) for f in sorted(found)}
    elif path.is_dir():
        files = {f.name: content_hash(f) for f in sorted(path.iterdir()) if f.is_file() and f.suffix in _MODEL_SUFFIXES}
    else:  # a built-in name (the tiny random model): its weights follow from the name
        files = {"name": str(model_path)}
    return {"files": files, **dtypes}


def data_content_id(path: str | None) -> str | None:
    return content_hash(path) if path else None


def lookup(kind: str, identity: dict[str, Any]) -> Any | None:
    """The value stored for exactly this identity, or None."""
    root = cache_root()
    if root is None:
        return None
    saved = _read_json(_entry(root, kind, identity))
    return saved.get("value") if saved.get("identity") == json.loads(json.dumps(identity)) else None


def store(kind: str, identity: dict[str, Any], value: Any) -> Path | None:
    """Save `value` under `identity` (atomically: a crash leaves the old entry or none)."""
    root = cache_root()
    if root is None:
        return None
    path = _entry(root, kind, identity)
    _write_json(path, {"identity": identity, "value": value})
    return path


def _entry(root: Path, kind: str, identity: dict[str, Any]) -> Path:
    return root / kind / f"{digest_key(identity)}.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False))
