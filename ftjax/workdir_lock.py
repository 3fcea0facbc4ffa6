"""One run per workdir: an OS file lock (flock) on WORKDIR/run.lock, held while the run lives.

The operating system drops the lock when the process ends, however it ends (kill -9 included), so no stale
lock is ever left to clear by hand. On several processes process 0 holds it and the others wait for its
answer before writing anything. Readers (eval, export, generate) ask `holder()`: while a run holds the
workdir they read only its complete checkpoints, and say so.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from ftjax.errors import ConfigError, FtjaxError

LOCK = "run.lock"


class WorkdirLocked(FtjaxError):
    """Another run holds this workdir (the entry point exits 2, as for bad input)."""


class _Held:
    path: Path | None = None  # the workdir this process's run held last, for the entry point's last line


_HELD = _Held()


def _describe(lock_file: Path) -> str:
    try:
        h = json.loads(lock_file.read_text() or "{}")
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def _make_workdir(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file, not a folder: pass a folder (new or a run's)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot create it ({e.strerror or e})") from None


def _lock(workdir: Path) -> int:
    """Process 0: the lock's file descriptor, or WorkdirLocked naming the holder."""
    _make_workdir(workdir)
    lock_file = workdir / LOCK
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirLocked(f"{workdir} is in use by another run ({_describe(lock_file)}); wait for it to end, "
                            "or pass another --workdir") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}).encode())
    return fd


@contextlib.contextmanager
def held(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold `workdir` for the block (creating it); a second run on it stops here, before any write."""
    import jax

    workdir = Path(workdir)
    fd, refused = None, None
    created_dir, created_lock = not workdir.exists(), not (workdir / LOCK).exists()
    if jax.process_index() == 0:
        try:
            fd = _lock(workdir)
        except FtjaxError as e:
            refused = e
    if jax.process_count() > 1:  # the others agree with process 0 before anything is written
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not ok and refused is None:
            refused = WorkdirLocked(f"process 0 could not take {workdir} (its line says why)")
    if refused is not None:
        raise refused
    if fd is None:
        _make_workdir(workdir)
    _HELD.path = workdir
    try:
        yield workdir
    except BaseException:
        if fd is not None and created_lock:  # a refused start (bad data, no model) leaves no empty workdir
            _remove_if_untouched(workdir, created_dir)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _remove_if_untouched(workdir: Path, created_dir: bool) -> None:
    """When nothing but the lock file this run created is in the workdir: remove it, and the workdir if this
    run created that too."""
    try:
        if [p.name for p in workdir.iterdir()] == [LOCK]:
            (workdir / LOCK).unlink()
            if created_dir:
                workdir.rmdir()
    except OSError:  # another process wrote into it meanwhile: it stays
        pass


def last_held() -> Path | None:
    """The workdir this process's run held last (held now, or until it ended), or None."""
    return _HELD.path


def holder(workdir: str | os.PathLike) -> str | None:
    """Who holds `workdir` ("pid N on HOST, started T"), or None when no run does (readers ask; they write
    nothing into the workdir)."""
    lock_file = Path(workdir) / LOCK
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(lock_file)
    finally:
        os.close(fd)  # also releases the shared lock just taken
    return None
