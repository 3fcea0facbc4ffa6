"""Greedy generation speed on SmolLM2-135M (what eval and the report spend their time on): prints the
median wall time of `generate_tokens` after a warm-up call, and per new token.

  .venv/bin/python benchmarks/generate_speed.py --batch=25 --prompt=200 --new=64 --repeats=3

Measured 2026-11-29 on the 2-core CPU, defaults, --repeats=2, two code trees alternated (PYTHONPATH set to
each; the editable install would otherwise import one tree twice): the KV cache as a scan carry written in
place 36.9 / 38.1 s vs the cache through the scan's xs/ys 51.8 / 55.2 s (1.43x).
"""

import argparse
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--prompt", type=int, default=200, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row (no EOS: all are generated)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ftjax
    from ftjax.generate import generate_tokens

    model = ftjax.load_model(args.model, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(100, 40000, args.prompt)) for _ in range(args.batch)]
    generate_tokens(model, prompts, max_new_tokens=args.new)  # compile
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate_tokens(model, prompts, max_new_tokens=args.new)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(f"generate: batch {args.batch} x prompt {args.prompt} + {args.new} new tokens: median {med:.2f} s "
          f"({1000 * med / args.new:.0f} ms per decode step incl. prefill share; runs {[round(t, 2) for t in times]})")


if __name__ == "__main__":
    main()
