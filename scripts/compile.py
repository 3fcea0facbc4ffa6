"""Compile a run's train step for a TPU slice on any host (no TPU, no weights), and say what one chip would hold:

  python scripts/compile.py --config=configs/NAME.py --topology=v5e:2x2 --out=FILE.json [--hlo=FILE.txt]
      [--config.KEY=VALUE ...]

The state is built from shapes (the model's from model.path when readable, else the recipe's HF_CONFIG), sharded
by the run's rules over the slice's devices, and the real step (loss terms, remat, frozen quantization, the TPU
attention kernel) compiled by XLA's TPU compiler (libtpu: pip install -e '.[tpu]'). The JSON holds XLA's bytes and
FLOPs per chip, the chip's HBM, `fits`, ftjax's estimate and FLOP formula beside them and a roofline estimate.
A run that does not fit is refused in one line (exit 2), by the estimate before compiling or by XLA's count after.
"""

from absl import app, flags
from ml_collections import config_flags

from ftjax import cli

config_flags.DEFINE_config_file("config", None, "Recipe: an ml_collections config file.", lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice as libtpu names it: v5e:2x2, v5p:2x2x1, v6e:8x8 (BUILD.md).")
flags.DEFINE_string("out", None, "Where the JSON report goes.")
flags.DEFINE_string("hlo", None, "Where the compiled program's HLO text goes (optional).")
flags.mark_flags_as_required(["config", "topology", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ftjax.train.aot import compile_recipe

    compile_recipe(cli.config_from_flags(), config_flags.get_config_filename(FLAGS["config"]), FLAGS.topology,
                   FLAGS.out, FLAGS.hlo)


if __name__ == "__main__":
    cli.run_app(main)
