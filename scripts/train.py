"""Fine-tune a model: `python scripts/train.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...]`.

A workdir that holds checkpoints resumes from the latest complete one. Multi-host: run the
same command on every process with --coordinator_address/--num_processes/--process_id (or
none of them on TPU VMs and SLURM, where JAX finds the cluster itself).
"""

from absl import app, flags
from ml_collections import config_flags

from ftjax import cli

config_flags.DEFINE_config_file("config", None, "Recipe: an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and the report go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.init_distributed()
    from ftjax.train.loop import run

    run(cli.config_from_flags(), FLAGS.workdir)


if __name__ == "__main__":
    cli.run_app(main)
