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
flags.DEFINE_integer("stop_exit_code", None, "Exit code after a requested stop (SIGINT / SIGTERM) has saved what "
                     "was done; default 130 for SIGINT, 143 for SIGTERM (0 for schedulers that want it).")


def init_distributed() -> None:
    """Join the multi-host run when there is one (flags, or JAX's cluster detection on SLURM / TPU VMs).

    A rendezvous first (ftjax.distributed) so that a process that does not join within
    --init_timeout is named in one line on every other process; on CPU, gloo collectives.
    """
    from ftjax.distributed import rendezvous
    from ftjax.errors import StartupError

    given = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        resolved = _cluster_params(*given, timeout_s=FLAGS.init_timeout)
    except ImportError:  # JAX moved its private cluster detection: initialize() still detects, unnamed errors
        _initialize_jax(*given)
        return
    if resolved is None:
        if given == (None, None, None):
            return  # one process
        raise StartupError("--coordinator_address, --num_processes and --process_id go together (or leave all "
                           "three empty for JAX's cluster detection on TPU VMs and SLURM)")
    if resolved[1] == 1:
        return
    rendezvous(*resolved, FLAGS.init_timeout)
    _initialize_jax(*resolved)


def _cluster_params(address: str | None, num_processes: int | None, process_id: int | None,
                    timeout_s: int) -> tuple[str, int, int] | None:
    """The three multi-host settings, unset ones filled in as jax.distributed.initialize would; None if unknown."""
    import os

    address = address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if None in (address, num_processes, process_id):
        # JAX's cluster detection (SLURM, TPU VMs, Open MPI, Kubernetes): the code initialize() itself runs.
        from jax._src.clusters import ClusterEnv

        address, num_processes, process_id, _ = ClusterEnv.auto_detect_unset_distributed_params(
            address, num_processes, process_id, None, None, timeout_s)
    if None in (address, num_processes, process_id):
        return None
    return str(address), int(num_processes), int(process_id)


def _initialize_jax(address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize with gloo CPU collectives; its long errors as one line."""
    import jax

    from ftjax.errors import StartupError

    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=FLAGS.init_timeout)
    except ValueError as e:
        if (address, num_processes, process_id) == (None, None, None) and "coordinator_address" in str(e):
            return  # no cluster found: one process
        raise StartupError(f"could not start the multi-host run: {str(e).splitlines()[0]}") from None
    except Exception as e:  # JAX's message is long; say what matters
        who = f"process {process_id}" if process_id is not None else "this process"
        raise StartupError(f"{who} could not join the run at {address} with {num_processes} processes: "
                           f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def run_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl main so ftjax's own errors end as one clear line and exit code 2."""

    def wrapped(argv: list[str]) -> None:
        from absl import logging

        from ftjax.errors import FtjaxError

        logging.set_verbosity(logging.WARNING)  # JAX's backend probing is INFO noise for users

        from ftjax import stop

        try:
            with stop.listening():
                main(argv)
        except FtjaxError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except stop.StopRequested as e:
            print(f"{e}. To finish the job, run: {stop.resume_command()}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code(e.signum, FLAGS.stop_exit_code))
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside any safe point
            print(f"interrupted. To finish the job, run: {stop.resume_command()}", file=sys.stderr, flush=True)
            sys.exit(FLAGS.stop_exit_code if FLAGS.stop_exit_code is not None else 130)

    return wrapped


def run_app(main: Callable[[list[str]], None]) -> None:
    """absl's app.run, with flag errors (a misspelled config key above all) as one line naming the fix."""
    from absl import app

    app.run(run_main(main), flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except Exception as e:  # absl and ml_collections raise several types, with long messages
        print(f"error: {_explain(e, argv)}", file=sys.stderr)
        sys.exit(2)


def _explain(error: Exception, argv: list[str]) -> str:
    """Name the misspelled config key and the closest valid one; else the first line that says why."""
    from ftjax.config import default_config, flat_keys, unknown_key_message

    valid = set(flat_keys(default_config()))
    for arg in argv:
        if arg.startswith("--config."):
            key = arg.split("=", 1)[0][len("--config."):]
            if key not in valid:
                return unknown_key_message(default_config(), key)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "Errno" in ln or "Error" in ln), lines[0] if lines else type(error).__name__)
    return f"{lines[0]} ({why})" if lines and why != lines[0] else why


def config_from_flags(name: str = "config"):
    """The --config ConfigDict; a config file that failed to load becomes one line."""
    from ftjax.errors import ConfigError

    try:
        config = getattr(FLAGS, name)
        list(config.keys())  # config_flags defers load errors until first use
        return config
    except OSError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        path = next((ln for ln in lines if ln.endswith(".py")), "?")
        why = next((ln for ln in lines if ln.startswith("[Errno") or "Error" in ln), lines[-1] if lines else "")
        raise ConfigError(f"--{name}={path}: could not load ({why})") from None
