"""Rollout throughput: generated tokens/s for P prompts x G completions of N new tokens (GRPO's sampling step
and the report's generation), prefill and decode timed apart, side by side with transformers' `generate` on the
same prompts in the same run, and the decode step against the time to read the weights once at the memory
bandwidth measured in the same run (a numpy copy of a large array, one thread and all threads).

  .venv/bin/python benchmarks/rollout_speed.py --prompts=8 --group=4 --new=64 --repeats=3 \\
      --out=runs/rollout_speed.json

Prompts are the demo task's eval prompts (chat template); every completion runs to N tokens (no EOS), sampled at
temperature 1 (`--temperature=0`: greedy). Prefill = a run with one new token; a decode step = (the N-token run -
the prefill run) / (N - 1). Medians over `--repeats` after a warm-up (compiles) of each; ftjax and transformers
alternate within each repeat so the machine's load falls on both alike. The weight-read bound counts every
parameter's bytes once a step (the tied embedding is the head: all of it is read) at the measured bandwidth
(bytes moved by the copy, read plus write, per second: what the memory system delivers).
`--model=smollm2-shape|tiny`: random weights of SmolLM2's shape or a small one (no download: benchmarks/gpu/).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# torch's OpenMP workers sleep when idle instead of spinning: on a loaded machine spinning threads steal the cores
# (a 2-layer model's decode step took seconds); JAX's thread pool does not spin
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def copy_bandwidth(nbytes: int, threads: int, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by numpy copying a `nbytes` array split over `threads` threads."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))  # numpy frees the GIL
        copy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            copy()
            times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def demo_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first `n` eval prompts of the demo task, chat template applied (what the report and GRPO sample on)."""
    from ftjax.data.records import Fields
    from ftjax.data.retain import as_messages
    from ftjax.evaluation.conversations import as_record, load_records, split_reply
    from ftjax.generate import encode_chat
    from ftjax.tasks import person_json

    _, eval_path = person_json.files(n_train=3000, n_eval=200)
    records = load_records(eval_path, Fields("messages", "prompt", "completion", "text"))[:n]
    return [encode_chat(tokenizer, as_messages(split_reply(as_record(r, f"eval:{i}"))[0]))
            for i, r in enumerate(records)]


SHAPES = {  # random-weight llamas: no download (the GPU machine has no network)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "smollm2-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3),
}


def load_pair(which: str, device: str):
    """(ftjax model, transformers model, tokenizer or None): SmolLM2-135M-Instruct fp32 from the shipped GGUF, or
    a random llama of a SHAPES shape saved and loaded by both (then prompts are random ids)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import ftjax
    if which in SHAPES:
        cfg = AutoConfig.for_model("llama", max_position_embeddings=2048, tie_word_embeddings=True, **SHAPES[which])
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        folder = tempfile.mkdtemp(prefix="rollout_model_")
        hf.save_pretrained(folder)
        from ftjax.interop.hf import load_hf
        return load_hf(folder), hf.to(device).eval(), None
    from ftjax.interop.smollm2 import default_gguf_path
    path = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return (ftjax.load_model("smollm2-135m-instruct", dtype="float32"), hf.to(device).eval(),
            ftjax.load_tokenizer("smollm2-135m-instruct"))


def device_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a jitted copy of a `nbytes` array on JAX's default device."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a * 1.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


def ftjax_run(model, rows, new: int, temperature: float, seed: int) -> float:
    from ftjax.generate import generate_tokens

    start = time.perf_counter()
    generate_tokens(model, rows, max_new_tokens=new, eos_ids=(), temperature=temperature, seed=seed)
    return time.perf_counter() - start


def hf_run(hf, rows, new: int, temperature: float, seed: int, device: str) -> float:
    """transformers' generate on the same left-padded rows, every row to `new` tokens (no EOS)."""
    import torch

    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    hf.generation_config.eos_token_id = None
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(input_ids=torch.as_tensor(ids, device=device), attention_mask=torch.as_tensor(mask, device=device),
                    max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **sampling)
        if device != "cpu":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args) -> dict:
    import jax
    import torch

    device = "cuda" if args.device == "gpu" else "cpu"
    model, hf, tokenizer = load_pair(args.model, device)
    if tokenizer is None:
        rng = np.random.default_rng(0)
        prompts = [list(rng.integers(3, 500, int(rng.integers(40, 60)))) for _ in range(args.prompts)]
    else:
        prompts = demo_prompts(tokenizer, args.prompts)
    rows = [p for p in prompts for _ in range(args.group)]
    runs = {"ftjax": lambda n, s: ftjax_run(model, rows, n, args.temperature, s),
            "transformers": lambda n, s: hf_run(hf, rows, n, args.temperature, s, device)}
    times = {(name, n): [] for name in runs for n in (1, args.new)}
    for name, run in runs.items():  # warm-up: compiles, caches
        for n in (1, args.new):
            run(n, 0)
    for r in range(args.repeats):  # alternated: one load on both
        for n in (1, args.new):
            for name, run in runs.items():
                times[(name, n)].append(run(n, r + 1))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k[0]} {k[1]} tok {v[-1]:.2f} s"
                                                           for k, v in times.items()), flush=True)
    weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model_state(model)))
    cores = os.cpu_count() or 1
    bw = {"1": copy_bandwidth(args.copy_mb << 20, 1), str(cores): copy_bandwidth(args.copy_mb << 20, cores)}
    if jax.default_backend() != "cpu":  # the weights are read from the accelerator's memory
        bw = {jax.default_backend(): device_bandwidth(args.copy_mb << 20)}
    best_bw = max(bw.values())
    out = {"prompts": args.prompts, "group": args.group, "rows": len(rows), "new": args.new,
           "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "temperature": args.temperature,
           "repeats": args.repeats, "jax_threads_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
           "cores": cores, "load_avg": os.getloadavg(), "weight_bytes": weight_bytes,
           "copy_bandwidth_Bps": bw, "weight_read_s": weight_bytes / best_bw, "results": {}}
    for name in runs:
        prefill = statistics.median(times[(name, 1)])
        total = statistics.median(times[(name, args.new)])
        step = (total - prefill) / (args.new - 1)
        out["results"][name] = {"prefill_s": prefill, "total_s": total, "decode_step_s": step,
                                "tokens_per_s": len(rows) * args.new / total, "decode_tokens_per_s": len(rows) / step,
                                "step_over_weight_read": step / out["weight_read_s"], "runs": {
                                    str(n): times[(name, n)] for n in (1, args.new)}}
    return out


def model_state(model):
    from flax import nnx

    return nnx.state(model)


def table(out: dict) -> str:
    lines = [f"{out['rows']} rows ({out['prompts']} prompts x {out['group']}), prompts {out['prompt_tokens'][0]}-"
             f"{out['prompt_tokens'][1]} tokens, {out['new']} new tokens, temperature {out['temperature']}, median of "
             f"{out['repeats']}, load {out['load_avg'][0]:.1f}, {out['cores']} cores, torch threads "
             f"{out['torch_threads']}",
             "| | prefill s | decode step ms | decode tokens/s | all tokens/s | step / weight read |",
             "|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        lines.append(f"| {name} | {r['prefill_s']:.2f} | {1000 * r['decode_step_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['step_over_weight_read']:.2f}x |")
    bw = ", ".join(f"{k if not k.isdigit() else k + ' thread(s)'} {v / 1e9:.1f} GB/s" for k, v in out["copy_bandwidth_Bps"].items())
    lines.append(f"weights {out['weight_bytes'] / 1e9:.3f} GB; copy bandwidth (read + write) {bw}: one read "
                 f"of the weights {1000 * out['weight_read_s']:.0f} ms")
    f, h = out["results"]["ftjax"], out["results"]["transformers"]
    lines.append(f"targets: decode >= transformers' tokens/s: {'met' if f['decode_tokens_per_s'] >= h['decode_tokens_per_s'] else 'missed'} "
                 f"({f['decode_tokens_per_s']:.0f} vs {h['decode_tokens_per_s']:.0f}); decode step within 2x of the "
                 f"weight read: {'met' if f['step_over_weight_read'] <= 2 else 'missed'} ({f['step_over_weight_read']:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="P distinct prompts")
    ap.add_argument("--group", type=int, default=4, help="G completions of each")
    ap.add_argument("--new", type=int, default=64, help="new tokens per completion")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copy_mb", type=int, default=512, help="the bandwidth measurement's array size")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where transformers runs (jax: its default)")
    ap.add_argument("--model", choices=("smollm2", *SHAPES), default="smollm2",
                    help="SmolLM2-135M-Instruct (the shipped GGUF), or random weights of a shape (no download)")
    ap.add_argument("--out", default=None, help="write the record (JSON) here")
    args = ap.parse_args(argv)
    if args.new < 2:
        ap.error("--new must be at least 2 (the decode step is timed from runs of 1 and --new tokens)")
    out = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **measure(args)}
    print(table(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
