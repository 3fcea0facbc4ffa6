"""What the after-training report costs, before and after a change, side by side on one machine: trains one
workdir (no report), then times `scripts/eval.py` on it for each (code tree, report size), alternating, each
with an empty $FTJAX_CACHE (nothing cached: a first run's report) and the tree on PYTHONPATH (the editable
install would otherwise import one tree twice).

  git archive 235226e | tar -x -C /tmp/before
  .venv/bin/python benchmarks/report_time.py --before=/tmp/before --after=. \\
      --config=configs/smollm2_135m_lora.py --steps=2 --repeats=1 --out=runs/report_time.json
      [--variants=before:full,after:full,after:quick]

Prints a table: report seconds per variant, and the after tree's per-phase times (report.json's meta.phases).

`--whole_run`: each tree runs the whole `scripts/train.py` (training, then the report) from scratch in its own
workdir and its own empty $FTJAX_CACHE (a first run: the task data, the base's results, e.g. a fresh NF4 base,
all computed), the trees at the same time so one load falls on both; prints wall, training and report seconds:

  .venv/bin/python benchmarks/report_time.py --whole_run --before=/tmp/before --after=. \
      --config=configs/smollm2_135m_qlora.py --steps=4 --out=runs/qlora_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _env(tree: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree.resolve()), "FTJAX_CACHE": str(cache)}


def _train(tree: Path, config: str, workdir: Path, steps: int, data_cache: Path) -> None:
    cmd = [sys.executable, str(tree / "scripts" / "train.py"), f"--config={config}", f"--workdir={workdir}",
           f"--config.train.steps={steps}", "--config.eval.final=false"]
    subprocess.run(cmd, env=_env(tree, data_cache), check=True, cwd=tree)


def _report(tree: Path, workdir: Path, size: str, data_cache: Path) -> dict:
    """One report from scratch: seconds, and the phases where the tree records them."""
    with tempfile.TemporaryDirectory() as cache:
        for name in ("person_json-3000-200-0", "person_json-64-16-0"):  # the task data, not a result
            if (data_cache / name).is_dir():
                shutil.copytree(data_cache / name, Path(cache) / name)
        for name in ("baselines.json", "retain_replies.json", "report.json"):  # the workdir's own caches
            (workdir / name).unlink(missing_ok=True)
        cmd = [sys.executable, str(tree / "scripts" / "eval.py"), f"--workdir={workdir}"]
        cmd += [] if size == "full" else [f"--report={size}"]
        start = time.perf_counter()
        subprocess.run(cmd, env=_env(tree, Path(cache)), check=True, cwd=tree, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    meta = json.loads((workdir / "report.json").read_text()).get("meta", {})
    return {"s": seconds, "phases": meta.get("phases")}


def _log_phases(log: Path) -> list[dict]:
    """The phases a run's log names with their seconds ("compiled the train step in N s", "eval: X: done in N s"):
    a tree that predates report.json's timing table prints them too."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = [{"phase": "compiling the train step", "s": float(m.group(1))}
             for m in re.finditer(r"compiled the train step in ([0-9.]+) s", text)]
    found += [{"phase": m.group(1), "s": float(m.group(2))} for m in re.finditer(r"eval: (.+?): done in ([0-9.]+) s", text)]
    held = {}  # the train bar's clock while the loop's eval loss runs (its last redraw: within the heartbeat)
    for m in re.finditer(r"step (\d+): eval loss on the held-out data \((\d+) s\)", text):
        held[m.group(1)] = max(held.get(m.group(1), 0.0), float(m.group(2)))
    found += [{"phase": f"the loop's eval loss at step {k} (train bar's last redraw)", "s": v} for k, v in held.items()]
    return found


def _whole_runs(args, trees: dict[str, Path], config: str) -> dict[str, dict]:
    """Every tree's whole train.py run started together (same load); wall seconds, and the report's own; the load
    average sampled every 30 s while any runs; each run's record written (`--out`) as it ends."""
    started, procs, tmp = {}, {}, Path(tempfile.mkdtemp(prefix="whole_run_"))
    for name, tree in trees.items():
        workdir, cache = tmp / name / "run", tmp / name / "cache"
        cache.mkdir(parents=True)
        cmd = [sys.executable, str(tree / "scripts" / "train.py"), f"--config={config}", f"--workdir={workdir}",
               f"--config.train.steps={args.steps}"]
        log = open(tmp / f"{name}.log", "w")
        started[name] = time.perf_counter()
        procs[name] = (subprocess.Popen(cmd, env=_env(tree, cache), cwd=tree, stdout=log, stderr=subprocess.STDOUT),
                       workdir)
    print(f"started {', '.join(trees)} at {time.strftime('%H:%M:%S')}; logs in {tmp}", flush=True)
    out: dict[str, dict] = {}
    loads: list[float] = []
    while len(out) < len(procs):
        loads.append(os.getloadavg()[0])
        for name, (proc, workdir) in procs.items():
            if name in out or proc.poll() is None:
                continue
            wall = time.perf_counter() - started[name]
            meta = json.loads((workdir / "report.json").read_text()).get("meta", {}) if proc.returncode == 0 else {}
            run = meta.get("run", {})
            out[name] = {"rc": proc.returncode, "wall_s": wall, "loop_wall_s": run.get("wall_s"),
                         "report_s": run.get("report_s"), "phases": meta.get("phases"),
                         "log_phases": _log_phases(tmp / f"{name}.log"), "ended": time.strftime("%H:%M:%S"),
                         "load_avg": os.getloadavg(), "load_1min_while_running": {
                             "min": min(loads), "median": statistics.median(loads), "max": max(loads)},
                         "log": str(tmp / f"{name}.log")}
            print(f"{name}: rc {proc.returncode}, {wall:.1f} s wall (report {run.get('report_s') or 0:.1f} s), "
                  f"load {min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})", flush=True)
            _write(args, out)
        if len(out) < len(procs):
            time.sleep(30)
    if all(r["rc"] == 0 for r in out.values()) and {"before", "after"} <= set(out):
        print(f"after / before: {out['after']['wall_s'] / out['before']['wall_s']:.3f}", flush=True)
    return out


def _write(args, runs: dict) -> None:
    record = {"command": " ".join(sys.argv), "config": args.config, "steps": args.steps, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the tree before the change (a git archive of it)")
    ap.add_argument("--after", default=".", help="the tree after the change")
    ap.add_argument("--config", default="configs/smollm2_135m_lora.py")
    ap.add_argument("--steps", type=int, default=2, help="training steps of the workdir the reports describe")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default="before:full,after:full,after:quick", help="TREE:SIZE, comma-separated")
    ap.add_argument("--out", default="runs/report_time.json")
    ap.add_argument("--whole_run", action="store_true", help="time each tree's whole train.py run, side by side")
    args = ap.parse_args()
    before, after = Path(args.before).resolve(), Path(args.after).resolve()
    config = str((after / args.config).resolve())
    if args.whole_run:
        _write(args, _whole_runs(args, {"before": before, "after": after}, config))
        return
    data_cache = Path(os.environ.get("FTJAX_CACHE", Path.home() / ".cache" / "ftjax"))
    trees = {"before": before, "after": after}
    variants = [(name, trees[name], size) for name, size in (v.split(":") for v in args.variants.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        _train(after, config, workdir, args.steps, data_cache)
        runs: dict[str, list[dict]] = {f"{name} {size}": [] for name, _, size in variants}
        for _ in range(args.repeats):  # alternated: the machine's load falls on every variant alike
            for name, tree, size in variants:
                runs[f"{name} {size}"].append({**_report(tree, workdir, size, data_cache),
                                               "load_avg": os.getloadavg()})
                _write(args, runs)  # each report as it ends: a long comparison cut short keeps what it measured
    print(f"report time, median of {args.repeats} (load average {os.getloadavg()[0]:.1f}), {args.config}:")
    for key, rs in runs.items():
        print(f"  {key:14} {statistics.median(r['s'] for r in rs):7.1f} s  (load {rs[-1]['load_avg'][0]:.1f})")
    for key, rs in runs.items():
        if rs[-1]["phases"]:
            print(f"phases ({key}):")
            for p in rs[-1]["phases"]:
                print(f"  {p['s']:7.1f} s  {p['phase']}")


if __name__ == "__main__":
    main()
