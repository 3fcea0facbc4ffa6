"""Shared helpers for tests that run the training loop on configs/tiny_test.py."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from ftjax.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str = "tiny_test"):
    """A configs/NAME.py recipe's get_config(), unlocked for test overrides."""
    return load_recipe(ROOT / "configs" / f"{name}.py")


def script_env(devices: int = 1, fault: str = "", **extra: str) -> dict[str, str]:
    """The environment of a scripts/ subprocess on `devices` simulated CPU devices (-O0, as the tests' own). A run
    whose subject is not the mesh takes one: ~40% less CPU than eight for the same job. `fault` (KIND@POINT)
    installs the tests' fault hook in it (tests/fault_site/sitecustomize.py)."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}
    if fault:
        env["FTJAX_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fault_site"), env.get("PYTHONPATH", ""), str(ROOT)])
    return env


def said(stderr: str) -> list[str]:
    """The lines a script printed to stderr, without tqdm's progress bar (its redraws end in a carriage return, or
    run straight into the next line when the process ends abruptly)."""
    out = []
    for piece in re.split(r"[\r\n]", stderr):
        bar = re.match(r"\s*\d+%\|.*?\|.*?\]", piece)  # "  50%|█████     | 3/6 [00:04<00:04, ...]"
        rest = piece[bar.end():] if bar else piece
        if rest.strip():
            out.append(rest.strip())
    return out


def metrics(workdir) -> list[dict]:
    """Every line of metrics.jsonl, in order (repeated steps kept)."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]


def tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} read from the TFRecord event files (no TensorFlow needed)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out
