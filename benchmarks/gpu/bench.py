"""GPU side-by-side: ftjax's default config against HF transformers + PEFT (eager sdpa, torch.compile).

Each measurement runs in its own process (own peak memory, no allocator left over from another run):

    python benchmarks/gpu/bench.py table [--tiny] [--out DIR]   # the 1B table (run.sh)
    python benchmarks/gpu/bench.py table8b [--tiny] [--out DIR] # the 8B LoRA pair (run_8b.sh)

Setting (issue 14): random-weight Llama-3.2-1B shape (16 layers, hidden 2048, MLP 8192, 32/8 heads,
vocab 128256, tied), batch 8 x 2048, loss on every position, AdamW (clip 1.0), LoRA r=16 alpha=32 on all
7 projections; median of 5 steps after 2 warm-up. ftjax: `scripts/benchmark.py` with the default config
(only model.path, method, data.seq_len, train.batch_size set). HF: LoRA on a bf16 model under bf16
autocast (PEFT keeps adapters fp32); full: fp32 master weights under bf16 autocast. MFU uses ftjax's
FLOP formula for both, against the data-sheet peak (989 TFLOP/s) and a bf16 matmul timed in this run.
`--tiny` runs the same path end to end on a tiny shape (CPU dry run).

Every record (ftjax's, HF's, the matmul peaks) is appended to $OUT/records.jsonl the moment its process prints it,
stamped with the commit (git, else $FTJAX_COMMIT), the date and nvidia-smi's GPU name, so a driver killed at its
time limit loses nothing measured; each run gets at most the budget left (--budget_s), and a failed ftjax run
is a table row naming the failure, followed by an `attention=xla` row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASHEET_PEAK = 989e12  # H100/H200 SXM dense bf16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # HF LlamaConfig fields
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0),
    "tiny": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ workers (one per process)

def build_folder(folder: str, shape: str) -> None:
    """A random-weight HF Llama folder (bf16 safetensors), made on the GPU when there is one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5, dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def matmul_peak() -> dict:
    """bf16 matmul FLOP/s in torch and in JAX on this device (n = 8192; 1024 on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 1024
    gen = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda" if cuda else "cpu", generator=gen) for _ in "ab")
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"torch_bf16_matmul_flops": 2.0 * n**3 / statistics.median(times), "n": n}


def jax_matmul_peak() -> float:
    import jax
    import jax.numpy as jnp

    n = 8192 if jax.default_backend() == "gpu" else 1024
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def hf_model(method: str, shape: str, folder: str | None):
    """The HF model (from `folder`, else random on the device) with PEFT LoRA for method=lora."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if method == "lora" else torch.float32  # full: fp32 master weights
    if folder:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")).to(dtype)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model, device


def hf_run(method: str, shape: str, folder: str | None, batch: int, seq_len: int, compiles: list[bool],
           steps: int, warmup: int) -> int:
    """HF + PEFT train steps (eager, then torch.compile on the same model and optimizer): one record each,
    printed as it is measured (a later timeout keeps the earlier ones); returns how many."""
    import numpy as np
    import torch

    model, device = hf_model(method, shape, folder)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: HF Trainer's AdamW on CUDA (adamw_torch_fused); the CPU dry run has no fused kernel
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=torch.cuda.is_available())
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    ids = torch.from_numpy(rng.integers(0, vocab, (batch, seq_len)).astype(np.int64)).to(device)
    targets = torch.from_numpy(rng.integers(0, vocab, (batch, seq_len)).astype(np.int64)).to(device)
    cuda = device == "cuda"
    out = 0
    for compiled in compiles:
        # the CPU dry run (--tiny) compiles with the eager backend: inductor's C++ build takes minutes there
        fwd = torch.compile(model, backend="inductor" if cuda else "eager") if compiled else model

        def step() -> float:
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = fwd(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()  # float() syncs
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        emit({"run": f"hf_{method}_{'compile' if compiled else 'eager'}", "tokens_per_s":
                    batch * seq_len / statistics.median(times), "step_times_s": times, "warmup_s": warm_s,
                    "peak_memory_bytes": peak, "final_loss": loss, "trainable_params": sum(p.numel() for p in params),
                    "batch": batch, "seq_len": seq_len, "torch_version": torch.__version__,
                    "attention_kernel": "sdpa (torch)", "optimizer": "AdamW (fused)" if cuda else "AdamW"})
        out += 1
    return out


def hf_largest(shape: str, seq_len: int, batches: list[int], steps: int, warmup: int) -> None:
    """HF + PEFT LoRA eager at the largest of `batches` that runs (an OOM moves to the next)."""
    import gc

    import torch

    for b in batches:
        try:
            if hf_run("lora", shape, None, b, seq_len, [False], steps, warmup):
                return
        except torch.cuda.OutOfMemoryError:
            say(f"hf lora batch {b}: out of memory")
            gc.collect()
            torch.cuda.empty_cache()


def emit(record: dict) -> None:
    """One result line on stdout (the driver reads every JSON line)."""
    print(json.dumps(record, default=str), flush=True)


def ftjax_largest(shape: str, seq_len: int, steps: int, warmup: int, max_batch: int, attention: str = "") -> dict:
    """ftjax LoRA (default config) on a random-weight model made on the device, at the largest batch that
    fits: compiled memory at batch 1 and 2 gives bytes per row, then the largest batch under 92% is run."""
    import jax

    import ftjax.interop.sources
    from ftjax import config as config_lib
    from ftjax.benchmark import Bench, random_batch, summarize
    from ftjax.metrics.peaks import peak_flops
    from ftjax.models.registry import config_from_hf
    from ftjax.sharding import mesh_from_config
    from ftjax.train.compose import compose
    from ftjax.train.setup import build_state
    from ftjax.train.state import state_size
    from ftjax.train.step import BATCH_KEYS, make_train_step

    # the tiny-random-llama path, with this shape: random weights initialized on the device, no folder
    ftjax.interop.sources.tiny_config = lambda dtype="float32", param_dtype=None: config_from_hf(
        hf_shape(shape), dtype=dtype, param_dtype=param_dtype or dtype)
    c = config_lib.default_config()
    c.model.path, c.method, c.data.seq_len, c.train.batch_size = "tiny-random-llama", "lora", seq_len, 1
    c.model.attention = attention or c.model.attention  # --attention xla: the fallback row
    c = config_lib.validate(c)
    t0 = time.perf_counter()
    mesh = mesh_from_config(c.mesh)
    setup = build_state(compose(c), mesh)
    state = setup.state
    step = make_train_step(state, setup.optimizer, mesh, grad_accum=1, loss_chunk=c.train.loss_chunk)
    rng = jax.random.key(0)

    def compiled_for(b: int):
        host = random_batch(b, seq_len, setup.model_config.vocab_size)
        batch = {k: jax.device_put(host[k], step.batch_sharding) for k in BATCH_KEYS}
        t = time.perf_counter()
        comp = step.lower(state.trainable, state.opt_state, state.frozen, batch, rng).compile()
        m = comp.memory_analysis()
        need = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return comp, batch, need, time.perf_counter() - t

    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit", 8 << 30)
    _, _, one, _ = compiled_for(1)
    _, _, two, _ = compiled_for(2)
    per_row = max(two - one, 1)
    best = int(max(1, min(max_batch, (0.9 * limit - one) // per_row + 1)))
    say(f"ftjax: {one / 2**30:.2f} GiB at batch 1, {per_row / 2**30:.2f} GiB per row, limit {limit / 2**30:.1f} GiB "
        f"-> batch {best}")
    for b in sorted({best, max(1, best * 3 // 4), max(1, best // 2)}, reverse=True):
        comp, batch, need, compile_s = compiled_for(b)
        c.train.batch_size = b
        frozen, streams = step.arguments(state.trainable, state.frozen, batch)  # what the compiled step takes
        bench = Bench(c, setup.model_config, comp, state.trainable, state.opt_state, frozen, streams, rng,
                      state_size(state.trainable)[1], mesh.size, compile_s, time.perf_counter() - t0)
        try:
            bench.run(warmup)
            break
        except Exception as e:  # the estimate missed: an allocation failed at run time
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            say(f"ftjax batch {b}: out of memory at run time")
    peak, source = peak_flops(c.model.dtype)
    rec = summarize(bench, bench.run(steps), peak, source)
    rec.update(run="ftjax_lora", estimated_bytes=need, bytes_per_row=per_row, memory_limit_bytes=limit)
    return rec


# ------------------------------------------------------------------ driver

STAMP: dict = {}  # commit, gpu: set by the driver (provenance()) and added to every record it keeps
RECORDS = [""]  # $OUT/records.jsonl, set by the driver


def provenance() -> dict:
    """Where the figures come from: the commit (git, else $FTJAX_COMMIT: the GPU copy has no .git), the GPU's name
    (nvidia-smi) and the date."""
    commit = os.environ.get("FTJAX_COMMIT") or _quiet(["git", "rev-parse", "--short=12", "HEAD"])
    gpu = _quiet(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
    return {"commit": commit or "unknown (no .git and FTJAX_COMMIT unset)",
            "gpu": ", ".join(sorted(set(gpu.splitlines()))) if gpu else "none (no nvidia-smi)"}


def _quiet(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else None


def keep(record: dict) -> dict:
    """Append `record` (stamped with commit, GPU and date) to records.jsonl now, flushed to disk."""
    rec = {**record, **STAMP}
    rec.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if RECORDS[0]:
        with open(RECORDS[0], "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return rec


def sub(args: list[str], env: dict | None = None, timeout: float = 600) -> tuple[list[dict], str | None]:
    """Run this file (or a script) in a fresh process for at most `timeout` s: (the JSON records it printed, each
    kept as it arrives, also before a failure or a timeout; None if it exited 0, else what failed)."""
    t0 = time.perf_counter()
    cmd = [sys.executable] + args
    say(f"$ {' '.join(cmd)}  (at most {timeout:.0f} s)")
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = []

    def kill():
        killed.append(True)
        try:
            os.killpg(p.pid, 9)  # its own session: torch.compile's workers go with it
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(timeout, 1.0), kill)
    timer.start()
    records, tail = [], deque(maxlen=20)
    try:
        for line in p.stdout:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                    keep(records[-1])
                    continue
                except ValueError:
                    pass
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
        code = p.wait()
    finally:
        timer.cancel()
    say(f"  exit {code} in {time.perf_counter() - t0:.1f} s")
    if killed:
        return records, f"timed out after {timeout:.0f} s"
    errors = [ln for ln in tail if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", ln)]  # the traceback's last line
    return records, None if code == 0 else f"exit {code}: {(errors or list(tail) or ['no output'])[-1][:300]}"


def first(records: list[dict]) -> dict:
    return records[0] if records else {}


def slug(flag: str) -> str:
    """`--config.model.attention=xla` -> `attention_xla`: a variant's file and row name."""
    key, _, value = flag.lstrip("-").partition("=")
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{key.split('.')[-1]}_{value}").strip("_")


def ftjax_record(method: str, folder: str, batch: int, seq_len: int, out_dir: str, extra: list[str],
                 timeout: float) -> dict:
    """scripts/benchmark.py with the default config (only model.path, method, seq_len, batch_size set, plus a
    variant's flags), into a file of its own; a failed run gives a record naming the failure."""
    name = f"ftjax_{method}" + "".join("_" + slug(e) for e in extra)
    path = os.path.join(out_dir, f"{name}.json")
    if os.path.exists(path):
        os.remove(path)  # an earlier run's figure must never be read back as this one's
    flags = [f"--config.model.path={folder}", f"--config.method={method}", f"--config.data.seq_len={seq_len}",
             f"--config.train.batch_size={batch}", *extra]
    _, failure = sub(["scripts/benchmark.py", "--config=benchmarks/gpu/default.py", f"--out={path}", *flags],
                     timeout=timeout)
    if failure is None and os.path.exists(path):
        with open(path) as f:
            rec = {**json.load(f), "run": name}
    else:
        rec = {"run": name, "method": method, "batch": batch, "seq_len": seq_len, "failed": failure or "no record"}
    return keep(rec)


def hf_shape(shape: str) -> dict:
    return {**SHAPES[shape], "model_type": "llama", "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
            "hidden_act": "silu", "architectures": ["LlamaForCausalLM"]}


def flops_per_token(shape: str, seq_len: int, method: str) -> float:
    """ftjax's formula (ftjax/metrics/flops.py) for this shape; LoRA r=16 on all 7 projections."""
    from ftjax.metrics.flops import adapter_flops_per_token, full_flops_per_token
    from ftjax.models.registry import config_from_hf

    cfg = config_from_hf(hf_shape(shape))
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lora = 16 * cfg.num_layers * ((d + q) * 2 + (d + kv) * 2 + (d + i) * 3)
    return adapter_flops_per_token(cfg, seq_len, lora) if method == "lora" else full_flops_per_token(cfg, seq_len)


def row(rec: dict, fpt: float, peaks: dict) -> dict:
    kernel = rec.get("attention_kernel") or (rec.get("model") or {}).get("attention")
    if "failed" in rec:
        return {"run": rec["run"], "failed": rec["failed"], "batch": rec.get("batch"), "attention": kernel}
    tps = rec["tokens_per_s"]
    return {"run": rec["run"], "tokens_per_s": tps, "mfu_datasheet": tps * fpt / DATASHEET_PEAK,
            "mfu_measured": tps * fpt / peaks["measured"],
            "peak_gib": None if rec.get("peak_memory_bytes") is None else rec["peak_memory_bytes"] / 2**30,
            "batch": rec.get("batch"), "final_loss": rec.get("final_loss"), "attention": kernel}


def print_table(rows: list[dict], ratios: list[tuple[str, str]], peaks: dict, wall: float, title: str) -> None:
    print(f"\n{title}")
    print(f"commit {STAMP.get('commit')}, GPU {STAMP.get('gpu')}, "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"bf16 matmul timed in this run: torch {peaks['torch'] / 1e12:.0f} TFLOP/s, JAX {peaks['jax'] / 1e12:.0f} "
          f"TFLOP/s (MFU 'measured' uses the larger); data sheet {DATASHEET_PEAK / 1e12:.0f} TFLOP/s")
    print(f"| run | batch | tokens/s | MFU ({DATASHEET_PEAK / 1e12:.0f}) | MFU (measured matmul) | peak GiB | loss "
          "| attention |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['run']} | {r['batch']} | failed: {r['failed']} | | | | | {r['attention'] or ''} |")
            continue
        print(f"| {r['run']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['mfu_datasheet']:.1%} | "
              f"{r['mfu_measured']:.1%} | {'n/a' if r['peak_gib'] is None else round(r['peak_gib'], 1)} | "
              f"{r['final_loss'] if r['final_loss'] is None else round(r['final_loss'], 3)} | {r['attention']} |")
    by = {r["run"]: r for r in rows if "failed" not in r}
    for a, b in ratios:
        a = a if a in by else f"{a}_attention_xla"  # the default kernel failed: its fallback row
        if a in by and b in by:
            mem = (f"{by[a]['peak_gib'] / by[b]['peak_gib']:.2f}x peak memory" if by[a]["peak_gib"] and by[b]["peak_gib"]
                   else "peak memory n/a")
            print(f"{a} / {b}: {by[a]['tokens_per_s'] / by[b]['tokens_per_s']:.2f}x tokens/s, {mem}")
    print(f"wall time of this script: {wall:.0f} s")


def measured_peaks(timeout: float) -> dict:
    torch_peak = first(sub([__file__, "worker", "matmul"], timeout=timeout)[0])
    jax_peak = first(sub([__file__, "worker", "jax_matmul"], timeout=timeout)[0])
    peaks = {"torch": torch_peak.get("torch_bf16_matmul_flops", 0.0), "jax": jax_peak.get("jax_bf16_matmul_flops", 0.0)}
    peaks["measured"] = max(peaks["torch"], peaks["jax"], 1.0)
    return peaks


def start_driver(args) -> tuple[str, float]:
    """The output folder (records.jsonl in it) and the start time; stamps every record from here on."""
    out_dir = args.out or os.environ.get("OUT") or "/tmp/ftjax_gpu_bench"
    os.makedirs(out_dir, exist_ok=True)
    RECORDS[0] = os.path.join(out_dir, "records.jsonl")
    STAMP.update(provenance())
    say(f"records: {RECORDS[0]} (commit {STAMP['commit']}, GPU {STAMP['gpu']})")
    return out_dir, time.perf_counter()


def table(args) -> None:
    """The 1B table: GPU tests are run by run.sh before this; here the folder, ftjax x2, HF x4, variants."""
    out_dir, start = start_driver(args)
    shape, batch, seq_len = ("tiny", 2, 128) if args.tiny else ("1b", 8, 2048)
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    folder = os.path.join(args.work, f"llama_{shape}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        sub([__file__, "worker", "build", "--folder", folder, "--shape", shape], timeout=left())
    peaks = measured_peaks(min(60.0, left()))
    recs: list[dict] = []
    for method in ("lora", "full"):  # LoRA's runs first: a budget cut loses the last full runs only
        if left() < 20:
            say(f"skipping ftjax {method}: {left():.0f} s of the budget left")
            continue
        recs.append(ftjax_record(method, folder, batch, seq_len, out_dir, [], left()))
        if "failed" in recs[-1] and left() > 20:  # the default kernel failed: the plain XLA attention instead
            recs.append(ftjax_record(method, folder, batch, seq_len, out_dir, ["--config.model.attention=xla"],
                                     left()))
        for compiled in ("0", "1"):
            if left() < 20:
                say(f"skipping HF {method} compile={compiled}: {left():.0f} s of the budget left")
                continue
            hf, failure = sub([__file__, "worker", "hf", "--method", method, "--shape", shape, "--folder", folder,
                               "--batch", str(batch), "--seq_len", str(seq_len), "--compiles", compiled],
                              timeout=left())
            recs += hf or [keep({"run": f"hf_{method}_{'compile' if compiled == '1' else 'eager'}", "batch": batch,
                                 "failed": failure or "no record"})]
    fpt = {m: flops_per_token(shape, seq_len, m) for m in ("lora", "full")}
    for r in recs:  # the formula here is the one ftjax's benchmark record used
        if "flops_per_token" in r and abs(r["flops_per_token"] / fpt[r["method"]] - 1) > 1e-6:
            say(f"warning: {r['run']} counted {r['flops_per_token']:.4g} FLOP/token, this table {fpt[r['method']]:.4g}")
    for extra in args.variants:  # e.g. --config.data.packing=False, when time is left
        if left() > 45:
            recs.append(ftjax_record("lora", folder, batch, seq_len, out_dir, [extra], left()))
        else:
            say(f"skipping variant {extra}: {left():.0f} s of the budget left")
    rows = [row(r, fpt["full" if r["run"].startswith(("ftjax_full", "hf_full")) else "lora"], peaks) for r in recs]
    wall = time.perf_counter() - start
    print_table(rows, [("ftjax_lora", "hf_lora_eager"), ("ftjax_lora", "hf_lora_compile"),
                       ("ftjax_full", "hf_full_eager"), ("ftjax_full", "hf_full_compile")], peaks, wall,
                f"{shape} shape, batch {batch} x {seq_len}, ftjax default config vs HF + PEFT")
    with open(os.path.join(out_dir, f"table_{shape}.json"), "w") as f:
        json.dump({"rows": rows, "records": recs, "peaks": peaks, "wall_s": wall, "shape": SHAPES[shape],
                   "batch": batch, "seq_len": seq_len, "flops_per_token": fpt, **STAMP}, f, indent=2)


def table8b(args) -> None:
    out_dir, start = start_driver(args)
    shape, seq_len, max_batch = ("tiny", 128, 8) if args.tiny else ("8b", 2048, 64)
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}  # alone on the GPU in its process
    # the matmul peaks are timed inside the two workers (no extra process start-ups in the budget); ftjax gets
    # up to 60% of it, then HF the rest
    worker = [__file__, "worker", "ftjax_largest", "--shape", shape, "--seq_len", str(seq_len), "--batch",
              str(max_batch)]
    out, failure = sub(worker, env=env, timeout=0.6 * left())
    ft = next((r for r in out if r.get("run") == "ftjax_lora"), None)
    recs = [ft] if ft else [keep({"run": "ftjax_lora", "failed": failure or "no record", "batch": None})]
    if ft is None and left() > 90:  # the default kernel failed: the plain XLA attention instead
        out, failure = sub(worker + ["--attention", "xla"], env=env, timeout=0.5 * left())
        xla = next((r for r in out if r.get("run") == "ftjax_lora"), None)
        recs.append({**xla, "run": "ftjax_lora_attention_xla"} if xla else
                    keep({"run": "ftjax_lora_attention_xla", "failed": failure or "no record", "batch": None}))
    peaks = {"jax": next((r["jax_bf16_matmul_flops"] for r in out if "jax_bf16_matmul_flops" in r), 0.0)}
    top = (ft or {}).get("batch") or max_batch
    batches = sorted({top + 4, top + 2, top, max(top - 2, 1), max(top // 2, 1), 1}, reverse=True)
    hf, failure = sub([__file__, "worker", "hf_largest", "--shape", shape, "--seq_len", str(seq_len),
                       "--batches", ",".join(map(str, batches))], timeout=max(left(), 30))
    peaks["torch"] = next((r["torch_bf16_matmul_flops"] for r in hf if "torch_bf16_matmul_flops" in r), 0.0)
    peaks["measured"] = max(peaks["torch"], peaks["jax"], 1.0)
    runs = [r for r in hf if "run" in r]
    recs += runs or [keep({"run": "hf_lora_eager", "failed": failure or "no record", "batch": None})]
    rows = [row(r, flops_per_token(shape, seq_len, "lora"), peaks) for r in recs]
    wall = time.perf_counter() - start
    print_table(rows, [("ftjax_lora", "hf_lora_eager")], peaks, wall,
                f"{shape} shape LoRA, {seq_len}-token rows, largest batch that fits, ftjax default config vs HF + PEFT")
    with open(os.path.join(out_dir, f"table_{shape}_lora.json"), "w") as f:
        json.dump({"rows": rows, "records": recs, "peaks": peaks, "wall_s": wall, "shape": SHAPES[shape], **STAMP},
                  f, indent=2)


def worker(args) -> None:
    steps, warmup = args.steps, args.warmup
    if args.what == "build":
        build_folder(args.folder, args.shape)
        emit({"folder": args.folder})
    elif args.what == "matmul":
        emit(matmul_peak())
    elif args.what == "jax_matmul":
        emit({"jax_bf16_matmul_flops": jax_matmul_peak()})
    elif args.what == "hf":
        hf_run(args.method, args.shape, args.folder, args.batch, args.seq_len,
               [bool(int(x)) for x in args.compiles.split(",")], steps, warmup)
    elif args.what == "hf_largest":
        emit(matmul_peak())
        hf_largest(args.shape, args.seq_len, [int(x) for x in args.batches.split(",")], steps, warmup)
    else:
        emit({"jax_bf16_matmul_flops": jax_matmul_peak()})
        emit(ftjax_largest(args.shape, args.seq_len, steps, warmup, args.batch, args.attention))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("table", "table8b", "worker"))
    ap.add_argument("what", nargs="?", default="")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--work", default=os.environ.get("FTJAX_BENCH_WORK", "/tmp/ftjax_gpu_bench_models"))
    ap.add_argument("--budget_s", type=float, default=330.0, help="skip later runs past this wall time")
    ap.add_argument("--variants", default="", help="extra ftjax LoRA runs, comma-separated --config flags")
    ap.add_argument("--folder", default="")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", default="")
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--compiles", default="0,1")
    ap.add_argument("--attention", default="", help="ftjax_largest: model.attention instead of the default")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    sys.path.insert(0, ROOT)
    {"table": table, "table8b": table8b, "worker": worker}[args.mode](args)


if __name__ == "__main__":
    main()
