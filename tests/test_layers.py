"""The layering of ARCHITECTURE.md, written as import-linter contracts in pyproject.toml, holds; it fails on an
upward import, on a circle hidden in a function, and on a module the contract does not place."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root` (that tree first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def layers_contract() -> dict:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["type"] == "layers")


def test_contracts_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_every_module_is_placed_in_one_layer():
    """Each module under ftjax/ falls in exactly one layer (by its top-level package or module name)."""
    contract = layers_contract()
    assert contract["exhaustive"] is True and contract["containers"] == ["ftjax"]
    layer_of: dict[str, int] = {}
    for i, layer in enumerate(contract["layers"]):
        for name in layer.replace("|", ":").split(":"):
            assert name.strip() not in layer_of, f"{name.strip()} is in two layers"
            layer_of[name.strip()] = i
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "ftjax").rglob("*.py"))
    assert len(modules) > 50
    unplaced = [m for m in modules if m != "ftjax.__init__" and m.split(".")[1] not in layer_of]
    assert unplaced == [], f"modules the import-linter contract does not place: {unplaced}"


def test_models_name_no_lora_factor():
    """Models apply adapters through `ftjax.models.adapter.Adapter`: nothing under ftjax/models/ names LoRA's
    factors (the contract above keeps the imports out; this keeps the names out)."""
    named = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "ftjax" / "models").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"lora_[ab]|lora_[AB]", line)]
    assert len(list((ROOT / "ftjax" / "models").rglob("*.py"))) >= 7
    assert named == [], f"lora_a / lora_b named under ftjax/models/: {named}"


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "ftjax", root / "ftjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("where, code, broken", [
    # an upward import: a model that reaches into training
    ("ftjax/models/llama.py", "from ftjax.train import step as _step  # noqa\n", "models know nothing of training"),
    # evaluation importing train, hidden inside a function (a circle: train imports evaluation)
    ("ftjax/evaluation/base.py", "def _hidden():\n    from ftjax.train import forget  # noqa\n", "ftjax layers"),
    # a circle inside one layer: the loaders' foundation importing the workdir loader
    ("ftjax/interop/sources.py", "def _hidden():\n    import ftjax.workdir  # noqa\n", "no import circle"),
    # a new top-level module that no layer names
    ("ftjax/unplaced.py", "X = 1\n", "ftjax layers"),
    # a model reaching for LoRA instead of its own adapter seam (ftjax.models.adapter)
    ("ftjax/models/layers.py", "def _hidden():\n    from ftjax.lora import LoRA  # noqa\n",
     "models define the adapter seam, lora fills it"),
    # one metrics idea importing another of its layer
    ("ftjax/metrics/writer.py", "from ftjax.metrics import cpu_peak  # noqa\n", "metrics one idea a module"),
])
def test_the_check_fails_on_a_broken_layering(tmp_path, where, code, broken):
    root = _copy(tmp_path)
    with open(root / where, "a") as f:
        f.write("\n\n" + code)
    out = lint(root)
    assert out.returncode != 0, out.stdout
    assert f"{broken} BROKEN" in out.stdout, out.stdout
