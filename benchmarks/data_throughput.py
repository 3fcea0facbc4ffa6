"""Tokens/s the data pipeline alone delivers, on the SmolLM2 tokenizer with generated chat data.

Measures (1) cold: JSONL -> validate -> tokenize -> pack (nothing cached) and (2) warm: Grain loader
batches with prefetch; reports batch x length tokens per second of each and of both together (a run
from scratch for one epoch), and the ratio to what the train step consumes (--consumed, default 300).

    .venv/bin/python benchmarks/data_throughput.py [--records 4000] [--seq_len 512] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax.config import default_config  # noqa: E402
from ftjax.data import build_datasets, train_iterator  # noqa: E402
from ftjax.data.token_cache import clear_memory  # noqa: E402
from ftjax.train.compose import data_spec  # noqa: E402

WORDS = ("the a model data token batch loss step learn train eval shard row pack mask chat user reply "
         "quick brown fox jumps over lazy dog river mountain city number seven twelve blue green").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats of varied length (1-3 turns, 5-80 words per message), some with a system prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _sentence(rng, 8)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": _sentence(rng, rng.randint(5, 40))})
            msgs.append({"role": "assistant", "content": _sentence(rng, rng.randint(5, 80))})
        out.append({"messages": msgs})
    return out


def _tokenizer():
    from ftjax.interop.gguf_tokenizer import gguf_tokenizer
    from ftjax.interop.smollm2 import default_gguf_path

    return gguf_tokenizer(default_gguf_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=0, help="loader batches to time (0: one epoch)")
    ap.add_argument("--consumed", type=float, default=300.0, help="tokens/s the train step consumes")
    args = ap.parse_args()

    tok = _tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chats.jsonl")
        with open(path, "w") as f:
            for r in make_records(args.records):
                f.write(json.dumps(r) + "\n")
        c = default_config()
        c.data.train, c.data.seq_len = path, args.seq_len
        clear_memory()
        t0 = time.perf_counter()
        data = build_datasets(data_spec(c), tok, vocab_size=len(tok))
        cold = time.perf_counter() - t0
    print(data.summary.format())
    rows = data.train
    n = args.batches or max(1, len(rows) // args.batch_size)
    it = train_iterator(rows, args.batch_size, seed=0, process_index=0, process_count=1, prefetch=c.data.prefetch)
    next(it)  # warm-up: starts the prefetch thread
    t0 = time.perf_counter()
    real = 0
    for _ in range(n):
        real += int((next(it)["segment_ids"] > 0).sum())
    warm = time.perf_counter() - t0
    it.close()
    per_batch = args.batch_size * args.seq_len
    epoch_tokens = len(rows) * args.seq_len
    cold_tps, warm_tps = epoch_tokens / cold, n * per_batch / warm
    total_tps = epoch_tokens / (cold + warm * len(rows) / (n * args.batch_size))
    print(f"cold build (validate + tokenize + pack {data.summary.records} records): {cold:.2f} s, "
          f"{cold_tps:,.0f} tokens/s")
    print(f"warm loader ({n} batches of {args.batch_size}x{args.seq_len}, "
          f"{100 * real / (n * per_batch):.0f}% non-padding): {warm_tps:,.0f} tokens/s")
    print(f"pipeline, one epoch from raw JSONL: {total_tps:,.0f} tokens/s = {total_tps / args.consumed:.0f}x the "
          f"{args.consumed:g} tokens/s the train step consumes (need >= 20x)")


if __name__ == "__main__":
    main()
