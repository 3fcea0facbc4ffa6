"""Where an evaluation's time goes: each phase's seconds, recorded as it ends, for the report's timing table
(a report cost more than the training it describes before anyone could see which phase to cut)."""

from __future__ import annotations

_RECORDED: list[dict] = []  # this process's phases, in order: {"phase": what, "s": seconds}


def record(what: str, seconds: float) -> None:
    _RECORDED.append({"phase": what, "s": round(float(seconds), 2)})


def mark() -> int:
    """A point to read the phases from (`since`): where a report starts."""
    return len(_RECORDED)


def since(start: int) -> list[dict]:
    """The phases that ended after `mark()` returned `start`."""
    return [dict(p) for p in _RECORDED[start:]]


def table(phases: list[dict], total_s: float | None = None) -> list[str]:
    """report.md's section: a row per phase, then what the phases do not cover (writing, plotting) and the total."""
    if not phases:
        return []
    out = ["## Where the report's time went", "", "| phase | seconds |", "|---|---|"]
    out += [f"| {p['phase']} | {p['s']:.0f} |" for p in phases]
    if total_s is not None:
        out += [f"| other (loading, writing) | {max(total_s - sum(p['s'] for p in phases), 0.0):.0f} |",
                f"| **report total** | **{total_s:.0f}** |"]
    return out + [""]
