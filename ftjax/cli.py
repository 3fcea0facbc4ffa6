"""Shared plumbing for the absl entry points: multi-host flags, distributed start-up, one-line errors."""

from __future__ import annotations

import os
import sys
from typing import Callable

import jax
from absl import app, flags, logging

from ftjax.config import default_config, flat_keys, unknown_key_message
from ftjax.distributed import rendezvous, split_address
from ftjax.errors import ConfigError, FtjaxError, StartupError
from ftjax.logs import quiet_orbax
from ftjax.platform import quiet_tpu_probe

FLAGS = flags.FLAGS

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs "
                    "(empty: JAX's own cluster detection on TPU VMs / SLURM, or a single process).")
flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("init_timeout", 300, "Seconds to wait for all processes to join.")
flags.DEFINE_float("heartbeat_timeout_s", 20, "Multi-host: a process silent (or gone) this long ends the run on "
                   "every other process with one line naming it and exit code 75; relaunch to resume.")
flags.DEFINE_integer("stop_exit_code", None, "Exit code after a requested stop (SIGINT / SIGTERM) has saved what "
                     "was done; default 130 for SIGINT, 143 for SIGTERM (0 for schedulers that want it).")


def init_distributed() -> None:
    """Join the multi-host run when there is one (flags, or JAX's cluster detection on SLURM / TPU VMs).

    With all three settings known (flags, or JAX_COORDINATOR_ADDRESS for the address), a rendezvous
    first (ftjax.distributed) so that a process that does not join within --init_timeout is named in one
    line on every other process. Otherwise jax.distributed.initialize detects the cluster itself (its
    errors then name nobody) or finds none (one process). On CPU, gloo collectives.
    """
    address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    given = (address, FLAGS.num_processes, FLAGS.process_id)
    if None in given:
        _initialize_jax(*given)
        return
    if FLAGS.num_processes == 1:
        return
    rendezvous(address, FLAGS.num_processes, FLAGS.process_id, FLAGS.init_timeout)
    _initialize_jax(*given)
    _watch_peers(address)


def _watch_peers(address: str) -> None:
    """Start the peers' heartbeat (ftjax/heartbeat.py): a dead or silent process ends the run in one line."""
    import numpy as np
    from jax.experimental import multihost_utils

    from ftjax import heartbeat

    def share_port(port: int) -> int:
        return int(multihost_utils.broadcast_one_to_all(np.int32(port)))

    heartbeat.start(split_address(address)[0], FLAGS.num_processes, FLAGS.process_id, FLAGS.heartbeat_timeout_s,
                    share_port)


def _initialize_jax(address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize with gloo CPU collectives; its long errors as one line."""
    on_cpu = jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms)
    collectives = jax.config.jax_cpu_collectives_implementation
    if on_cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        # JAX's own dead-peer abort (a C++ stack dump) comes after ours (ftjax/heartbeat.py, one line)
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=FLAGS.init_timeout,
                                   heartbeat_timeout_seconds=max(100, int(3 * FLAGS.heartbeat_timeout_s)))
    except ValueError as e:
        if on_cpu:
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        if num_processes is None and process_id is None and "coordinator_address" in str(e):
            return  # no cluster found: one process
        raise StartupError(f"could not start the multi-host run: {str(e).splitlines()[0]}") from None
    except Exception as e:  # JAX's message is long; say what matters
        who = f"process {process_id}" if process_id is not None else "this process"
        raise StartupError(f"{who} could not join the run at {address} with {num_processes} processes: "
                           f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def run_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl main so ftjax's own errors end as one clear line and exit code 2."""

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # JAX's backend probing is INFO noise for users
        quiet_orbax()

        from ftjax import heartbeat, stop
        from ftjax.fault_log import ForeignThreadStderr, orbax_unraisable_to_log

        sys.stderr = ForeignThreadStderr(sys.stderr)  # Orbax's C++ callbacks' tracebacks go to the workdir's log
        sys.unraisablehook = orbax_unraisable_to_log  # and its dropped read coroutines' (a damaged checkpoint)
        try:
            with stop.listening():
                main(argv)
            heartbeat.stop()
        except FtjaxError as e:
            if e.exit_code == 2:  # bad input: every process stops alike, no peer is lost
                heartbeat.stop()
            print(f"error: {e}", file=sys.stderr, flush=True)
            _exit(e.exit_code)
        except stop.StopRequested as e:
            heartbeat.stop()
            print(f"{e}{_what_next()}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code(e.signum, FLAGS.stop_exit_code))
        except Exception:
            heartbeat.grace()  # a lost peer may fail a collective here first: its one line, not this traceback
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside any safe point
            print(f"interrupted{_what_next()}", file=sys.stderr, flush=True)
            sys.exit(FLAGS.stop_exit_code if FLAGS.stop_exit_code is not None else 130)

    return wrapped


def _what_next() -> str:
    """". To finish the job, run: CMD", or, for a training run stopped before its first checkpoint, that nothing
    was saved and the same command starts over."""
    from ftjax import stop, workdir_lock
    from ftjax.checkpoint_faults import complete_steps

    workdir = workdir_lock.last_held()
    if workdir is not None and not complete_steps(workdir):
        return f": nothing was saved in {workdir}; the same command starts over: {stop.resume_command()}"
    return f". To finish the job, run: {stop.resume_command()}"


def _exit(code: int) -> None:
    """Exit with `code`. After a failed save or a lost peer, Orbax's writer threads and JAX's collectives may
    still be running: the process ends at once, without the traceback their shutdown would print."""
    if code == 2:
        sys.exit(code)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def run_app(main: Callable[[list[str]], None]) -> None:
    """absl's app.run, with flag errors (a misspelled config key above all) as one line naming the fix. Standard
    output is line-buffered: piped to `tee` or a cluster's log file, each line shows when it is printed."""
    quiet_tpu_probe()  # before JAX starts its backends: libtpu on a host without TPUs stays silent
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    app.run(run_main(main), flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except Exception as e:  # absl and ml_collections raise several types, with long messages
        print(f"error: {_explain(e, argv)}", file=sys.stderr)
        sys.exit(2)


def _explain(error: Exception, argv: list[str]) -> str:
    """Name the misspelled config key and the closest valid one; else the first line that says why."""
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
    try:
        config = getattr(FLAGS, name)
        list(config.keys())  # config_flags defers load errors until first use
        return config
    except OSError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        path = next((ln for ln in lines if ln.endswith(".py")), "?")
        why = next((ln for ln in lines if ln.startswith("[Errno") or "Error" in ln), lines[-1] if lines else "")
        raise ConfigError(f"--{name}={path}: could not load ({why})") from None
