"""Time the train step: `python scripts/benchmark.py --config=configs/NAME.py --out=FILE.json [--config.KEY=...]`.

Builds the state from the config (its `method`, model, LoRA and optimizer settings), feeds a random
batch of exactly train.batch_size x data.seq_len tokens with loss on every position (no data files
are read), times --steps steps after --warmup, and writes tokens/s, step times, compile time, MFU
against a stated peak and peak memory as JSON (see ftjax/benchmark.py).
"""

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from ftjax import cli

config_flags.DEFINE_config_file("config", None, "Recipe: an ml_collections config file.", lock_config=True)
flags.DEFINE_string("out", None, "Where the JSON record goes.")
flags.DEFINE_integer("steps", 5, "Timed steps (after warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
flags.mark_flags_as_required(["config", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.init_distributed()
    from ftjax import config as config_lib
    from ftjax.benchmark import run_benchmark

    config = config_lib.validate(cli.config_from_flags())
    record = run_benchmark(config, steps=FLAGS.steps, warmup=FLAGS.warmup, say=lambda m: print(m, flush=True))
    record["command"] = "scripts/benchmark.py " + " ".join(a for a in __import__("sys").argv[1:])
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)  # --out=runs/bench.json on a fresh clone
    with open(FLAGS.out, "w") as f:
        json.dump(record, f, indent=2)
    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else f"({record['mfu_note']})"
    print(f"{record['method']}: {record['tokens_per_s']:.1f} tokens/s, step {record['step_time_s']:.3f} s "
          f"(median of {len(record['step_times_s'])}), compile {record['compile_s']:.1f} s, MFU {mfu} "
          f"of {record['peak_flops'] / 1e9:.0f} GFLOP/s ({record['peak_source']}), peak memory "
          f"{record['peak_memory_bytes'] / 2**30:.2f} GiB -> {FLAGS.out}")


if __name__ == "__main__":
    cli.run_app(main)
