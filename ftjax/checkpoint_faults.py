"""What a run does when a checkpoint cannot be written or read: one line that names the path and what was kept.

A save that fails (disk full, quota, read-only disk, permission) stops the run: the partial step folder the
save left is removed and the last complete checkpoint stays. A checkpoint that cannot be read (a truncated
file, a missing item) is moved aside to WORKDIR/damaged_checkpoints/ (kept, never deleted) and the resume
falls back to the newest one that reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from ftjax import fault_log
from ftjax.errors import LoadError, WriteError

TMP = ".orbax-checkpoint-tmp"
DAMAGED = "damaged_checkpoints"


def complete_steps(workdir: str | Path) -> list[int]:
    """The steps of WORKDIR's complete checkpoints (Orbax renames a step's folder to its number once whole)."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def last_complete(workdir: str | Path) -> str:
    """What is kept, in words: the last complete checkpoint's path, or that none is complete yet."""
    steps = complete_steps(workdir)
    return f"the last complete checkpoint is {Path(workdir) / 'checkpoints' / str(steps[-1])} (kept)" if steps else \
        "no checkpoint is complete yet"


def save_failed(directory: Path, step: int, need_bytes: int, error: BaseException, main: bool) -> WriteError:
    """The one-line error for a save that could not be written; removes the partial step folders it left."""
    workdir = directory.parent
    partial = sorted(directory.glob(f"*{TMP}*")) if directory.is_dir() else []
    failed = min((int(p.name.split(".")[0]) for p in partial if p.name.split(".")[0].isdigit()), default=step)
    log = fault_log.note(workdir, f"saving step {failed} to {directory} failed", error)
    if main:
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
    where = f"details in {log}" if log else "no room for the details in the workdir either"
    return WriteError(f"cannot save step {failed} to {directory}: {fault_log.reason(error)} "
                      f"({fault_log.free_bytes(directory):,} bytes free there, the save needs ~{need_bytes:,}); "
                      f"{last_complete(workdir)}; {where}")


def room_warning(directory: Path, need_bytes: int, keep: int) -> str:
    """One line when `keep` checkpoints (and the one being written) of ~`need_bytes` will not fit, else ''."""
    free = fault_log.free_bytes(directory)
    kept = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0
    want = (keep + 1) * need_bytes
    if free + kept >= want:
        return ""
    return (f"warning: {directory} has {free:,} bytes free; checkpoint.keep={keep} checkpoints of ~{need_bytes:,} "
            f"bytes and the one being written need ~{want:,}: a save will fail when the disk fills")


def restore_newest(steps: list[int], restore: Callable[[int], Any], workdir: Path, say: Callable[[str], None],
                   set_aside: Callable[[list[int]], None]) -> tuple[int, Any] | None:
    """(step, restored) from the newest checkpoint in `steps` that `restore` reads; the damaged newer ones are
    named in one line and handed to `set_aside`. None without checkpoints; LoadError when none reads."""
    damaged: list[tuple[int, str]] = []
    for step in sorted(steps, reverse=True):
        try:
            restored = restore(step)
        except Exception as e:  # tensorstore, Orbax and tree_map each raise their own types for a damaged file
            fault_log.note(workdir, f"checkpoint step {step} cannot be read", e)
            damaged.append((step, fault_log.reason(e)))
            continue
        if damaged:
            set_aside([s for s, _ in damaged])
            say(f"checkpoint{'s' if len(damaged) > 1 else ''} {', '.join(str(s) for s, _ in damaged)} in "
                f"{workdir / 'checkpoints'} cannot be read ({damaged[0][1]}): moved to {workdir / DAMAGED}, "
                f"kept; resuming from step {step}, the newest that reads (details in {workdir / fault_log.NAME})")
        return step, restored
    if damaged:
        names = "; ".join(f"step {s}: {why}" for s, why in damaged)
        raise LoadError(f"no checkpoint in {workdir / 'checkpoints'} can be read ({names}); details in "
                        f"{workdir / fault_log.NAME}. Move them aside to start over, or restore a copy")
    return None


def move_aside(workdir: Path, steps: list[int]) -> None:
    """Damaged step folders -> WORKDIR/damaged_checkpoints/<step> (kept for a person to look at)."""
    target = workdir / DAMAGED
    target.mkdir(exist_ok=True)
    for step in steps:
        dst, n = target / str(step), 1
        while dst.exists():  # the same step set aside before: both kept
            dst, n = target / f"{step}.{n}", n + 1
        (workdir / "checkpoints" / str(step)).rename(dst)
