"""A/B ftjax variants side by side: each variant (XLA flags, env, config overrides) in its own process,
timed blocks alternated between them so machine load hits all alike; medians after warm-up.

    .venv/bin/python benchmarks/ab.py --method lora --rounds 4 --steps 2 \\
        --variant 'base||' --variant 'dotonly|XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot|' \\
        --variant 'minimal||model.remat=minimal,train.loss_chunk=128'

A variant is NAME|ENV=V;ENV=V|KEY=VALUE,KEY=VALUE (config keys as in ftjax.config; values parsed
as Python literals where possible). The SmolLM2-135M setting of benchmarks/compare_hf.py is the base.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_variant(spec: str) -> tuple[str, dict[str, str], dict[str, object]]:
    name, env_s, cfg_s = (spec.split("|") + ["", ""])[:3]
    env = dict(kv.split("=", 1) for kv in env_s.split(";") if kv)
    cfg = {}
    for kv in filter(None, cfg_s.split(",")):
        k, v = kv.split("=", 1)
        try:
            cfg[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            cfg[k] = v
    return name, env, cfg


def worker(method: str, cfg: dict, batch: int, seq_len: int, warmup: int) -> None:
    from ftjax.benchmark import prepare, smollm2_config

    c = smollm2_config(method, batch, seq_len)
    for k, v in cfg.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    bench = prepare(c)
    mem = bench.compiled.memory_analysis()
    bench.run(warmup)
    out, sys.stdout = sys.stdout, sys.stderr
    out.write(json.dumps({"compile_s": bench.compile_s, "temp_bytes": mem.temp_size_in_bytes,
                          "loss": bench.last_loss}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.startswith("run"):
            n = int(line.split()[1])
            reply = {"times": bench.run(n), "cpu": bench.cpu_times[-n:], "load": os.getloadavg()[0],
                     "loss": bench.last_loss}
        else:
            reply = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if not line.startswith("run"):
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.method, json.loads(args.worker), args.batch, args.seq_len, args.warmup)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} method={args.method} batch={args.batch}x{args.seq_len} "
          f"load {os.getloadavg()}", flush=True)
    procs = {}
    for spec in args.variant:
        name, env, cfg = parse_variant(spec)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg), "--method", args.method,
               "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--warmup", str(args.warmup)]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
        ready = json.loads(p.stdout.readline())  # one at a time: compiles do not overlap
        print(f"{name}: compile {ready['compile_s']:.1f}s, temp {ready['temp_bytes'] / 2**20:.0f} MiB, "
              f"loss {ready['loss']:.5f}", flush=True)
        procs[name] = (p, [], [])
    names = list(procs)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            p, times, cpu = procs[name]
            p.stdin.write(f"run {args.steps}\n")
            p.stdin.flush()
            reply = json.loads(p.stdout.readline())
            times += reply["times"]
            cpu += reply["cpu"]
            print(f"  round {r} {name}: {[round(t, 2) for t in reply['times']]} s, cpu "
                  f"{[round(t, 2) for t in reply['cpu']]} s, load {reply['load']:.2f}", flush=True)
    tokens = args.batch * args.seq_len
    for name in names:
        p, times, cpu = procs[name]
        p.stdin.write("done\n")
        p.stdin.flush()
        rss = json.loads(p.stdout.readline())["rss"]
        p.wait()
        med = statistics.median(times)
        print(f"{name:14s} median {med:.3f}s  {tokens / med:7.1f} tokens/s  best {min(times):.3f}s  "
              f"cpu median {statistics.median(cpu):.2f}s  peak RSS {rss / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
