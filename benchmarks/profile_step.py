"""Where the CPU train step spends its time: one traced step, XLA ops summed by name (self time).

    .venv/bin/python benchmarks/profile_step.py [--method lora|full] [--top 40] [--config.KEY=...]

Uses jax.profiler's trace and ProfileData (no TensorBoard needed); prints the ops (fusions,
dots, copies) with the most total time, and each one's share of the traced step.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dot_flops(hlo_text: str) -> dict[str, float]:
    """FLOPs of every op (fusion or plain dot) that holds a dot, by instruction name, from optimized HLO."""
    import re

    comp_flops: dict[str, float] = {}
    current = None
    shape_of: dict[str, list[int]] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^%?(\S+) .*\{$", line) if not line.startswith(" ") else None
        if m:
            current = m.group(1)
            shape_of = {}
            for pm in re.finditer(r"(\S+): [a-z0-9]+\[([0-9,]*)\]", line):
                shape_of[pm.group(1)] = [int(x) for x in pm.group(2).split(",") if x]
            continue
        im = re.match(r"\s+(?:ROOT )?%(\S+) = [a-z0-9]+\[([0-9,]*)\]\S* (\w[\w-]*)\((.*)", line)
        if not im:
            continue
        name, shape, op, rest = im.group(1), [int(x) for x in im.group(2).split(",") if x], im.group(3), im.group(4)
        shape_of[name] = shape
        if op == "dot":
            lhs = re.match(r"%(\S+?)[,)]", rest).group(1)
            cm = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
            k = 1
            for d in (cm.group(1).split(",") if cm and cm.group(1) else []):
                k *= shape_of.get(lhs, [1] * 8)[int(d)]
            flops = 2.0 * k
            for d in shape:
                flops *= d
            comp_flops[current] = comp_flops.get(current, 0.0) + flops
            comp_flops["%" + name] = flops
        elif op == "fusion":
            cm = re.search(r"calls=%(\S+?)[,\s]", rest)
            if cm and cm.group(1) in comp_flops:
                comp_flops["%" + name] = comp_flops[cm.group(1)]
    return {k[1:]: v for k, v in comp_flops.items() if k.startswith("%")}


def summarize_trace(folder: str, top: int, flops: dict[str, float] | None = None) -> None:
    """Self time (own duration less nested events) summed by op name over all threads of the trace."""
    import glob

    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(files[0])
    self_s: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    busy: dict[str, float] = {}
    for plane in data.planes:
        for line in plane.lines:
            events = sorted(((ev.start_ns, ev.duration_ns, ev.name) for ev in line.events), key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end_ns, name, child_ns]
            for start, dur, name in events:
                while stack and stack[-1][0] <= start:
                    end, n, child = stack.pop()
                    self_s[n] += 0  # already accounted when pushed
                stack and stack[-1].__setitem__(2, stack[-1][2] + dur)
                self_s[name] += dur / 1e9
                if stack:
                    self_s[stack[-1][1]] -= dur / 1e9
                count[name] += 1
                stack.append([start + dur, name, 0])
            if "XLAEigen" in line.name or "XLAPjRt" in line.name:
                busy[line.name] = sum(d for s_, d, n in events if n == "ThunkExecutor::Execute") / 1e9
    print("threads' ThunkExecutor time:", {k[-12:]: round(v, 2) for k, v in busy.items()})
    rows = sorted(self_s.items(), key=lambda kv: -kv[1])
    total = sum(v for k, v in self_s.items() if not k.startswith("$"))
    flops = flops or {}
    dot_s = sum(v for k, v in self_s.items() if k in flops)
    dot_f = sum(flops[k] * count[k] for k in self_s if k in flops)
    print(f"ops {total:.3f}s; ops with dots {dot_s:.3f}s at {dot_f / max(dot_s, 1e-9) / 1e9:.0f} GFLOP/s "
          f"({dot_f / 1e9:.0f} GFLOP)")
    for name, secs in rows[:top]:
        rate = f"{flops[name] * count[name] / secs / 1e9:6.0f} GFLOP/s" if name in flops and secs > 0 else " " * 14
        print(f"{secs:8.3f}s {100 * secs / total:5.1f}% {count[name]:6d}x {rate} {name[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--trace_dir", default="")
    ap.add_argument("--set", action="append", default=[], help="config KEY=VALUE (python literal)")
    args = ap.parse_args()
    import ast

    import jax

    from ftjax.benchmark import prepare, smollm2_config

    c = smollm2_config(args.method)
    for kv in args.set:
        k, v = kv.split("=", 1)
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        try:
            node[leaf] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            node[leaf] = v
    bench = prepare(c)
    print("warm-up", [round(t, 2) for t in bench.run(2)], flush=True)
    folder = args.trace_dir or tempfile.mkdtemp(prefix="ftjax_trace_")
    with jax.profiler.trace(folder):
        times = bench.run(1)
    print("traced step", times, "trace in", folder)
    summarize_trace(folder, args.top, dot_flops(bench.compiled.as_text()))


if __name__ == "__main__":
    main()
