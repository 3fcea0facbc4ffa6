"""Tokenize once: tokenized examples cached in memory and, optionally, on disk under a content key.

The key covers everything the tokens depend on (file content hash, tokenizer + template hash, loss_on,
field names), so a changed file or tokenizer is re-tokenized and never read stale.
"""

from __future__ import annotations

import os
from typing import Callable

from ftjax.data.examples import Examples

CACHE_VERSION = 1
_MEMORY: dict[str, Examples] = {}
_MEMORY_LIMIT = 32  # cached token sets kept per process (oldest evicted first)


def cached_examples(key: str, compute: Callable[[], Examples], cache_dir: str | None = None) -> Examples:
    """`compute()` the first time a key is seen, then the stored result (memory first, then disk)."""
    key = f"v{CACHE_VERSION}-{key}"
    if key in _MEMORY:
        return _MEMORY[key]
    path = os.path.join(cache_dir, f"tokens-{key}.npz") if cache_dir else None
    if path and os.path.exists(path):
        try:
            examples = Examples.load(path)
        except (OSError, ValueError, KeyError):  # unreadable cache file: recompute and overwrite it
            examples = None
    else:
        examples = None
    if examples is None:
        examples = compute()
        if path:
            examples.save(path)
    if len(_MEMORY) >= _MEMORY_LIMIT:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = examples
    return examples


def clear_memory() -> None:
    """Forget the in-memory cache (tests; long-lived processes that switch data)."""
    _MEMORY.clear()
