"""Shared plumbing for the absl entry points: multi-host flags, distributed start-up, one-line errors."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs "
                    "(empty: JAX's own cluster detection on TPU VMs / SLURM, or a single process).")
flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("init_timeout", 300, "Seconds to wait for all processes to join.")


def init_distributed() -> None:
    """Join the multi-host run when asked; on CPU use gloo collectives. One line on a time-out."""
    import jax

    if FLAGS.num_processes is None and FLAGS.coordinator_address is None:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                   initialization_timeout=FLAGS.init_timeout)
    except Exception as e:  # JAX's message is long; say what matters
        who = f"process {FLAGS.process_id}" if FLAGS.process_id is not None else "this process"
        raise SystemExit(
            f"error: {who} could not join the run at {FLAGS.coordinator_address} with "
            f"{FLAGS.num_processes} processes within {FLAGS.init_timeout}s: {str(e).splitlines()[0]}")


def run_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl main so ftjax's own errors end as one clear line and exit code 2."""

    def wrapped(argv: list[str]) -> None:
        from absl import logging

        from ftjax.errors import FtjaxError

        logging.set_verbosity(logging.WARNING)  # JAX's backend probing is INFO noise for users

        try:
            main(argv)
        except FtjaxError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
