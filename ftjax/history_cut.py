"""One history per run: a resume cuts metrics.jsonl and the TensorBoard events back to the step it resumes
from, so every step appears once and the plots show one curve.

The rows after that step (logged by a run that died or stopped past its last save) are not thrown away:
they move to metrics.cut.jsonl and tensorboard.cut/ beside them.
"""

from __future__ import annotations

import struct
from pathlib import Path

METRICS, METRICS_CUT = "metrics.jsonl", "metrics.cut.jsonl"
EVENTS, EVENTS_CUT = "tensorboard", "tensorboard.cut"


def cut_history(workdir: str | Path, step: int) -> str:
    """Move every logged row and TensorBoard event after `step` (0: a start from scratch) to the side files,
    and say so in one line ('' when nothing moved). Process 0 calls it before the run's first write."""
    workdir = Path(workdir)
    moved = _cut_metrics(workdir, step)
    for events in sorted((workdir / EVENTS).glob("events.out.tfevents.*")):
        _cut_events(events, workdir / EVENTS_CUT / events.name, step)
    if not moved:
        return ""
    why = (f"logged after step {step}, the checkpoint this run resumes from" if step else
           "logged by an earlier start that saved no checkpoint: this run starts over")
    return f"{moved} rows of {workdir / METRICS} {why}, moved to {METRICS_CUT} (and {EVENTS_CUT}/)"


def _row_step(line: str) -> int:
    """The "step" of one metrics.jsonl row."""
    import json

    return int(json.loads(line)["step"])


def _cut_metrics(workdir: Path, step: int) -> int:
    path = workdir / METRICS
    if not path.exists():
        return 0
    lines = [ln for ln in path.read_text().splitlines(keepends=True) if ln.strip()]
    keep = [ln for ln in lines if _row_step(ln) <= step]
    cut = [ln for ln in lines if _row_step(ln) > step]
    if cut:
        with open(workdir / METRICS_CUT, "a") as f:
            f.writelines(cut)
        _replace(path, "".join(keep).encode())
    return len(cut)


def _cut_events(path: Path, side: Path, step: int) -> None:
    """Split a TFRecord event file by each event's step; the records are copied byte for byte (CRCs kept)."""
    data = path.read_bytes()
    keep, cut, pos = [], [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):  # a record cut short by the crash: dropped
            break
        record = data[pos:end]
        (cut if _event_step(data[pos + 12:pos + 12 + length]) > step else keep).append(record)
        pos = end
    if cut or pos != len(data):
        side.parent.mkdir(exist_ok=True)
        with open(side, "ab") as f:
            f.write(b"".join(cut))
        _replace(path, b"".join(keep))


def _event_step(event: bytes) -> int:
    """Field 2 (`step`, a varint) of a tensorflow.Event message; 0 when absent (the file-version record)."""
    pos = 0
    while pos < len(event):
        key, pos = _varint(event, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(event, pos)
            if field == 2:
                return value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(event, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            break
    return 0


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _replace(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a temporary file renamed into place (a crash leaves one or the other)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
