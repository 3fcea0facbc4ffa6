"""Eval records as chat turns: the prompt (every turn before the last reply), the reference, few-shot prompts.

Records are the data pipeline's validated `Record`s (or raw JSON objects in any of its three forms), so an
eval file that trains also evaluates, with the same file:line errors.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ftjax.data.records import BadRecord, Fields, Record, read_file, validate
from ftjax.errors import DataError

Turns = tuple[tuple[str, str], ...]


def as_record(obj: Any, source: str = "<record>") -> Record:
    """A `Record` from a Record or a JSON object ({"messages"}, {"prompt", "completion"})."""
    if isinstance(obj, Record):
        return obj
    try:
        return validate(obj, source, Fields())
    except BadRecord as e:
        raise DataError(f"{source}: {e.detail}") from None


def load_records(path: str, fields: Fields = Fields()) -> list[Record]:
    """Chat/completion records of a JSONL/JSON file (text records cannot be scored and are refused)."""
    records = read_file(path, fields).records
    for r in records:
        if r.kind == "text":
            raise DataError(f"{r.source}: a text record has no reply to score; eval data for generation needs "
                            f"messages or prompt/completion records")
    return records


def split_reply(record: Record) -> tuple[Turns, str]:
    """(prompt turns, reference reply): the conversation up to its last assistant turn, and that turn."""
    turns = record.messages
    if not turns or turns[-1][0] != "assistant":
        raise DataError(f"{record.source}: the last turn must be the assistant's reply")
    return tuple(turns[:-1]), turns[-1][1]


def pick_shots(records: Sequence[Any], k: int, seed: int = 0) -> list[Record]:
    """k distinct train records drawn with `seed`: the same shots for every eval example."""
    if k <= 0:
        return []
    pool = [as_record(r, f"shot:{i}") for i, r in enumerate(records)]
    if len(pool) < k:
        raise DataError(f"eval.few_shot={k} needs at least {k} train records, got {len(pool)}")
    return random.Random(seed).sample(pool, k)


def few_shot_turns(prompt: Turns, shots: Sequence[Record]) -> Turns:
    """The prompt with each shot's user/assistant turns prepended as earlier turns of the same chat.

    The eval prompt's system message (if any) stays first; the shots' own system messages are dropped.
    """
    system = tuple(t for t in prompt[:1] if t[0] == "system")
    prior = tuple(t for shot in shots for t in shot.messages if t[0] != "system")
    return system + prior + tuple(prompt[len(system):])
