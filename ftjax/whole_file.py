"""Files written whole or not at all (a temporary sibling renamed into place), readable as every other file a
run writes: mkstemp's 0600 widened to what the umask allows a new file (0644 under the usual 022)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # read once, at import: setting it is the only way to read it
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_umask()


def write_whole(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` (creating its folder); a crash leaves the old file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
