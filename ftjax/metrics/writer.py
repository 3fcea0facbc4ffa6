"""The run's metric records: metrics.jsonl (one JSON object per logged step) mirrored to TensorBoard."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: its writer imports torch when installed only to
    accept torch tensors (ftjax logs floats), 1.8 s of every run's start here. Torch stays importable after."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:  # nothing left to keep out
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError; tensorboardX treats torch as absent
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self._tb = _summary_writer_class()(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
        return np.asarray(v).item()
    return v


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """metrics.jsonl as a list; a resumed run's repeated steps keep their latest record."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = {**by_step.get(rec["step"], {}), **rec}
    return [by_step[s] for s in sorted(by_step)]
