"""Bit for bit: the same training runs on two source trees, their logged losses compared exactly (==, not close).

Each tree runs its own scripts/train.py with PYTHONPATH set to itself, from its own root, on the same config, seed
and data files (one CPU device, eval off); a run that already left its steps in OUT is not run again, so the
trees can run at different times (one before a change, one after).

  git -C REPO archive COMMIT | tar -x -C /tmp/before && echo COMMIT > /tmp/before/COMMIT   # each tree
  python benchmarks/bit_identity.py --before=/tmp/before --after=/tmp/after --out=/tmp/bit [--runs=tiny_sft,tiny_dpo]
      [--only=before|after] [--steps=8]

Runs: tiny_sft (configs/tiny_test.py), tiny_dpo (the same with objective=dpo on the tests' generated sum pairs),
smollm2_sft (configs/smollm2_135m_lora.py), smollm2_dpo (configs/smollm2_135m_dpo.py continuing smollm2_sft's
adapter, as the recipe continues the demo's), smollm2_dpo_lowmem (the same batch with remat=full and a 64-position
loss chunk: ~half the memory). Prints one line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RECIPES = {"tiny_sft": "configs/tiny_test.py", "tiny_dpo": "configs/tiny_test.py",
           "smollm2_sft": "configs/smollm2_135m_lora.py", "smollm2_dpo": "configs/smollm2_135m_dpo.py",
           "smollm2_dpo_lowmem": "configs/smollm2_135m_dpo.py"}
CONTINUES = {"smollm2_dpo": "smollm2_sft", "smollm2_dpo_lowmem": "smollm2_sft"}  # model.path: that run's workdir
# The recipe's batch in less memory (a shared machine's OOM killer takes the largest process): every layer
# recomputed in the backward pass, the cross-entropy's logits 64 positions at a time.
LOWMEM = ["--config.model.remat=full", "--config.train.loss_chunk=64"]


def write_pairs(folder: Path, n_train: int = 16, n_eval: int = 8, seed: int = 0) -> tuple[str, str]:
    """tests/preference_helpers.write_pairs: generated sums in TRL's preference format (right sum chosen)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from preference_helpers import write_pairs as tests_write_pairs

    return tests_write_pairs(folder, n_train, n_eval, seed)


def flags(name: str, steps: int, out: Path, label: str, pairs: tuple[str, str]) -> list[str]:
    """scripts/train.py's config flags of run `name` (log every step, no eval, no checkpoint before the end)."""
    out_flags = [f"--config.train.steps={steps}", "--config.train.log_every=1", "--config.eval.final=False",
                 "--config.eval.every=0", f"--config.checkpoint.every={steps}"]
    if name == "tiny_dpo":
        out_flags += ["--config.objective=dpo", f"--config.data.train={pairs[0]}", f"--config.data.eval={pairs[1]}",
                      "--config.eval.metric=exact"]
    if name in CONTINUES:
        out_flags.append(f"--config.model.path={out / label / CONTINUES[name]}")
    if name.endswith("_lowmem"):
        out_flags += LOWMEM
    return out_flags


def losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in rows if "loss" in r]


def train(tree: Path, name: str, steps: int, out: Path, label: str, pairs: tuple[str, str]) -> list[float]:
    """Run `name` on `tree` (unless OUT holds its steps already); its logged losses."""
    workdir = out / label / name
    if (workdir / "metrics.jsonl").is_file() and len(losses(workdir)) >= steps:
        return losses(workdir)
    if name in CONTINUES:
        train(tree, CONTINUES[name], steps, out, label, pairs)
    if workdir.exists():  # a run cut short (killed): started again from nothing, not resumed
        shutil.rmtree(workdir)
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)  # one CPU device, XLA's default optimization level: as a user's CPU run
    cmd = [sys.executable, "scripts/train.py", f"--config={RECIPES[name]}", f"--workdir={workdir}",
           *flags(name, steps, out, label, pairs)]
    log = out / label / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{label} {name}: {' '.join(cmd)}  (in {tree}; log {log})", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{label} {name} failed (exit {done.returncode}); see {log}")
    return losses(workdir)


def commit(tree: Path) -> str:
    """The tree's git commit: a `git archive` export's COMMIT file (written by whoever exported it), else git's."""
    if (tree / "COMMIT").is_file():
        return (tree / "COMMIT").read_text().strip()
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "(unknown)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", default="tiny_sft,tiny_dpo,smollm2_sft,smollm2_dpo")
    p.add_argument("--only", choices=("before", "after"))
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pairs = write_pairs(a.out)
    names = a.runs.split(",")
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    if a.only:
        trees = {a.only: trees[a.only]}
    got = {label: {n: train(tree, n, a.steps, a.out, label, pairs)[:a.steps] for n in names}
           for label, tree in trees.items()}
    if a.only:
        return
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{date}; before {a.before} ({commit(a.before)}), after {a.after} ({commit(a.after)})")
    print("| run | steps | losses equal (==) | step-1 loss | step-8 loss |\n|---|---|---|---|---|")
    for n in names:
        b, f = got["before"][n], got["after"][n]
        same = "yes" if b == f and len(b) == a.steps else f"NO (before {b}, after {f})"
        print(f"| {n} | {len(b)} | {same} | {b[0]!r} | {b[-1]!r} |")


if __name__ == "__main__":
    main()
