"""Exports are atomic: written into a sibling temporary folder that is renamed to --out once complete, so an
export cut short (kill -9, a full disk) leaves the previous export or nothing at --out, never half of one.
The next export removes what an interrupted one left."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator


def partial_of(out: Path) -> Path:
    """Where an export to `out` is written until it is complete."""
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def replaced_when_complete(out: str | Path, main: bool) -> Iterator[Path]:
    """Yield the temporary folder to write into; when the block ends without error, it takes `out`'s place
    (only the writing process, `main`, touches the disk)."""
    out = Path(out)
    partial, old = partial_of(out), out.with_name(out.name + ".old")
    if main:
        for leftover in (partial, old):  # an interrupted export's: nothing in them is whole
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
        partial.mkdir(parents=True)
    yield partial
    if main:
        if out.exists():
            out.rename(old)  # the previous export steps aside only once the new one is whole
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
