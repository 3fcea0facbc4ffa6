"""The crash / preemption tests' hook, installed in every scripts/ subprocess they start with a fault
(loop_helpers.script_env(fault=...) puts this folder on PYTHONPATH, so Python imports it at start-up).

FTJAX_FAULT=KIND@POINT signals this process once, when it first reaches POINT: a step number (as the step
ends), or a word of a phase's name as it is entered (eval, report, export, writing). KIND: kill, term, int.
"""

import os
import signal

_KINDS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


def _install(spec: str) -> None:
    from ftjax import stop

    kind, _, at = spec.partition("@")
    fired = []

    def hook(point) -> None:
        hit = str(point) == at if isinstance(point, int) else at in point
        if hit and not fired:
            fired.append(point)
            os.kill(os.getpid(), _KINDS[kind])

    stop.install_hook(hook)


if os.environ.get("FTJAX_FAULT"):
    _install(os.environ["FTJAX_FAULT"])
