"""Where a QLoRA run's evaluation time goes on this machine, two questions (issue 30's remaining cost):

  --what=eval_loss   the loop's end-of-training eval loss: how many batches, one compile or several, seconds each
                     (the recipe's eval rows, its batch size, its jitted eval; two passes)
  --what=dense       the report's scoring and generation on the NF4 base (dequantized inside every forward) vs a
                     dense copy dequantized once, same inputs: seconds and the NLL sum (two rounds, alternated)

  FTJAX_CACHE=/tmp/cache .venv/bin/python benchmarks/qlora_eval_cost.py --what=eval_loss \\
      --config=configs/smollm2_135m_qlora.py --workdir=/tmp/qlora_eval_cost
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import data as data_lib
from ftjax.api import load_tokenizer
from ftjax.config import load_recipe
from ftjax.train.compose import compose


def eval_loss_cost(run, workdir: Path) -> None:
    from ftjax.objectives.held_out import make_eval_loss
    from ftjax.sharding import batch_sharding
    from ftjax.train import loop

    job = loop.prepare(run, workdir)
    s = run.schedule
    rows = run.objective.read_data(run, load_tokenizer(run.model.path), None).eval
    print(f"eval rows {len(rows)}, batch {s.batch_size}: {-(-len(rows) // s.batch_size)} batches", flush=True)
    sums = make_eval_loss(job.state.graphdef, s.loss_chunk)
    sharding = batch_sharding(job.step_fn.mesh, job.step_fn.rules)
    for rep in range(2):
        times = []
        for batch in data_lib.eval_iterator(rows, s.batch_size, sharding=sharding):
            start = time.perf_counter()
            jax.block_until_ready(sums(job.trainable, job.frozen.model, batch))
            times.append(time.perf_counter() - start)
        rest = sorted(times[1:])
        print(f"pass {rep}: total {sum(times):.1f} s, first batch {times[0]:.1f} s, the rest's median "
              f"{rest[len(rest) // 2]:.2f} s", flush=True)


def dense_cost(run) -> None:
    from ftjax.evaluation.base import base_view
    from ftjax.evaluation.conversations import as_record, load_records, split_reply
    from ftjax.evaluation.task import generate_replies, reference_sequences
    from ftjax.evaluation.token_stats import teacher_forced
    from ftjax.lora import linears
    from ftjax.models.layers import dense_kernel
    from ftjax.quant.weight import QuantizedParam
    from ftjax.train.setup import build_state

    tokenizer = load_tokenizer(run.model.path)
    base = base_view(build_state(run).state.model())
    dense = nnx.clone(base)
    for _, linear in linears(dense):
        if isinstance(linear.kernel, QuantizedParam):
            linear.kernel = nnx.Param(dense_kernel(linear.kernel, jnp.float32), **linear.kernel.get_metadata())
    records = load_records(run.data.eval, run.data.fields)[:32]
    pairs = [split_reply(as_record(r, f"eval:{i}")) for i, r in enumerate(records)]
    sequences = reference_sequences(tokenizer, [p for p, _ in pairs], [r for _, r in pairs])
    for name, model in (("nf4", base), ("dense", dense), ("nf4", base), ("dense", dense)):
        start = time.perf_counter()
        sums = teacher_forced(model, sequences)
        scored = time.perf_counter()
        replies = generate_replies(model, tokenizer, [p for p, _ in pairs[:16]], max_new_tokens=24, batch_size=16)
        print(f"{name}: scoring 32 sequences {scored - start:.1f} s (NLL sum {sums.nll.sum():.4f}), generating 16 "
              f"x 24 tokens {time.perf_counter() - scored:.1f} s, first reply {replies[0][:40]!r}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=("eval_loss", "dense"), required=True)
    ap.add_argument("--config", default="configs/smollm2_135m_qlora.py")
    ap.add_argument("--workdir", default="/tmp/qlora_eval_cost")
    args = ap.parse_args()
    config = load_recipe(Path(args.config))
    config.train.steps, config.eval.report = 1, "none"
    run = compose(config)
    eval_loss_cost(run, Path(args.workdir)) if args.what == "eval_loss" else dense_cost(run)


if __name__ == "__main__":
    main()
