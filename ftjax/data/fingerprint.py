"""Content fingerprints (size + SHA-256) of data files and tokenizers.

They go into the run's record so that a resume on changed data is refused, and they key the token cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def file_fingerprint(path: str) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of one file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def dir_fingerprint(path: str) -> dict[str, Any]:
    """Fingerprint of a folder (a prepared TFDS dataset): total size and a hash over its files' hashes."""
    h, size = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            fp = file_fingerprint(full)
            size += fp["size"]
            h.update(f"{os.path.relpath(full, path)}\0{fp['sha256']}\0".encode())
    return {"size": size, "sha256": h.hexdigest()}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over the tokenizer's vocabulary/merges, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "len": len(tokenizer),
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def digest_key(*parts: Any) -> str:
    """A short stable key from JSON-able parts (for cache file names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
