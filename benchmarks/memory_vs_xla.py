"""The pre-compile memory estimate (ftjax/train/memory.py) against XLA's TPU figure, per large recipe and its slice.

  python benchmarks/memory_vs_xla.py [--compile] [--only=NAME,...]

XLA's bytes per chip come from scripts/compile.py's records in benchmarks/tpu/NAME.json (each recipe's docstring
quotes the command; --compile recompiles them here first: minutes each). The estimate is recomputed from shapes
with the current code, on the same slice's abstract devices. A row is within tolerance when
|estimate / XLA - 1| <= 15%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "tpu"
TOLERANCE = 0.15
# recipe -> the TPU slice its docstring names
SLICES = {
    "llama3_8b_lora": "v5p:2x2x1",
    "llama3_8b_qlora": "v5e:1x1",
    "qwen3_8b_lora": "v5p:2x2x1",
    "gemma3_4b_lora": "v5p:1x1x1",
    "qwen3_30b_a3b_lora": "v5p:2x2x2",
    "llama3_70b_lora_fsdp": "v5p:4x4x2",
    "llama3_70b_qlora": "v5p:1x1x1",
}


def compile_record(name: str, topology: str) -> None:
    """scripts/compile.py for one recipe, its report into benchmarks/tpu/NAME.json."""
    RECORDS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "compile.py"), f"--config=configs/{name}.py",
                    f"--topology={topology}", f"--out={RECORDS / f'{name}.json'}"], cwd=ROOT, check=True)


def estimated_bytes(name: str, topology: str) -> dict[str, int]:
    """The estimate's parts per chip for the recipe on the slice (its `auto` keys resolved for TPU)."""
    from ftjax.config import load_recipe
    from ftjax.platform import topology_devices
    from ftjax.train.aot import model_shape
    from ftjax.train.compose import compose
    from ftjax.train.memory import estimate, on_platform

    recipe = ROOT / "configs" / f"{name}.py"
    run = compose(load_recipe(recipe), topology_devices(topology))  # `auto`: the slice's values
    return estimate(run, on_platform(model_shape(run.model, recipe), "tpu"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="recompile the records first (minutes each)")
    parser.add_argument("--only", default="", help="comma-separated recipe names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SLICES)
    gib = 1024**3
    print(f"{'recipe':<22} {'slice':<10} {'XLA GiB/chip':>12} {'estimate':>9} {'est/XLA':>8}  "
          f"XLA args+temps | estimate parts (GiB)")
    worst = 0.0
    for name in names:
        topology = SLICES[name]
        if args.compile:
            compile_record(name, topology)
        path = RECORDS / f"{name}.json"
        if not path.exists():
            print(f"{name:<22} {topology:<10} (no record: python scripts/compile.py --config=configs/{name}.py "
                  f"--topology={topology} --out={path.relative_to(ROOT)})")
            worst = float("inf")
            continue
        record = json.loads(path.read_text())
        xla = record["bytes_per_device"]
        parts = estimated_bytes(name, topology)
        est = sum(parts.values())
        ratio = est / xla
        worst = max(worst, abs(ratio - 1))
        xp = record["bytes_per_device_parts"]
        print(f"{name:<22} {topology:<10} {xla / gib:>12.2f} {est / gib:>9.2f} {ratio:>8.2f}  "
              f"{xp['arguments'] / gib:.2f}+{xp['temporaries'] / gib:.2f} | "
              + " ".join(f"{k} {v / gib:.2f}" for k, v in parts.items()))
    print(f"largest gap {worst:.1%} (tolerance {TOLERANCE:.0%})" if worst != float("inf")
          else "some recipes have no record yet")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    from ftjax.platform import quiet_tpu_probe

    quiet_tpu_probe()
    sys.exit(main())
