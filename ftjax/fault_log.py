"""The details behind a one-line fault message: WORKDIR/faults.log, which the line names.

Orbax's background writers report a failed save with a traceback per thread; those records go here (into
the log of the workdir this process's run holds) instead of the terminal, where one line says what happened.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from ftjax import workdir_lock

NAME = "faults.log"
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def note(workdir: str | os.PathLike | None, what: str, error: BaseException | None = None) -> Path | None:
    """Append `what` (and `error`'s traceback) to WORKDIR/faults.log; its path. When the workdir's disk is the
    one that is full, the details go to faults-PID.log in the system's temporary folder instead; None if
    neither can be written."""
    if workdir is None:
        return None
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = f"--- {stamp} pid {os.getpid()}: {what}\n"
    if error is not None:
        text += "".join(traceback.format_exception(error))
    return _append(workdir, text)


def _append(workdir: str | os.PathLike, text: str) -> Path | None:
    for path in (Path(workdir) / NAME, Path(tempfile.gettempdir()) / f"ftjax-faults-{os.getpid()}.log"):
        try:
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def reason(error: BaseException) -> str:
    """Why a write failed, in words: the OS error in it or its causes (Orbax wraps tensorstore's), else its
    first line."""
    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        code, text = getattr(e, "errno", None), str(e)
        for number, words in _REASONS.items():
            if code == number or f"os_error_code='{number}'" in text or f"[Errno {number}]" in text:
                return words
    # tensorstore's status line ("OUT_OF_RANGE: Error reading ... ") says more than the wrappers around it
    status = next((e for e in chain if re.match(r"[A-Z_]{5,}: ", str(e))), error)
    return (str(status).splitlines() or [type(status).__name__])[0][:300]


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


class OrbaxErrorsToLog(logging.Filter):
    """Orbax's own error records (a failed background save logs one traceback per thread) go to the held
    workdir's faults.log; the one-line message replaces them on the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "/orbax/" not in record.pathname.replace(os.sep, "/"):
            return True
        workdir = workdir_lock.last_held()
        if workdir is None:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return note(workdir, record.getMessage(), error) is None  # kept on screen when it cannot be logged


class ForeignThreadStderr:
    """sys.stderr, except for what threads started outside Python write: when a save fails, tensorstore's C++
    callbacks print a traceback each ("Event loop is closed") as Orbax's asyncio loops close; those go to the
    held workdir's faults.log. Python's own threads (the progress bar, the peers' watch) write as before."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        workdir = workdir_lock.last_held()
        if workdir is not None and isinstance(threading.current_thread(), threading._DummyThread):
            if _append(workdir, text) is not None:  # in pieces as printed: no header each
                return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def orbax_unraisable_to_log(unraisable) -> None:
    """sys.unraisablehook: an exception Python cannot raise (an Orbax read coroutine dropped after a damaged
    checkpoint failed to read, collected later) goes to the held workdir's faults.log when it comes from Orbax
    or tensorstore; anything else is printed as Python's default hook prints it."""
    tb = "".join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
    workdir = workdir_lock.last_held()
    if workdir is not None and ("/orbax/" in tb.replace(os.sep, "/") or "TensorStore" in tb):
        if note(workdir, f"exception ignored in {unraisable.object!r}", unraisable.exc_value) is not None:
            return
    sys.__unraisablehook__(unraisable)
