"""The retain set: general prompts whose answers fine-tuning should not change, some with known answers.

Bundled: `retain.jsonl` (40 general instructions, 20 general-knowledge questions), on which forgetting is
measured, and `control.jsonl` (50 other general prompts), which the controls (replay, KL) train on, so that
the forgetting figures are measured on prompts the controls never saw. A user's own file
(`forget.retain`) is JSONL with, per line, `{"prompt": ..., "answer": ...optional}` or
`{"messages": [...]}`: a conversation ending with a user turn, or with an assistant turn that is then the
user's own reply for replay (`{"prompt", "completion"}` likewise). `answer` may list alternatives as
"seven|7"; QA accuracy counts a reply that contains one as whole words.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from ftjax.data.records import iter_json
from ftjax.errors import DataError

BUNDLED = Path(__file__).with_name("retain.jsonl")
CONTROL_BUNDLED = Path(__file__).with_name("control.jsonl")
Turns = tuple[tuple[str, str], ...]



def as_messages(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat turns (role, content) as the messages a chat template takes."""
    return [{"role": role, "content": content} for role, content in turns]


@dataclasses.dataclass(frozen=True)
class RetainItem:
    """A prompt (chat turns ending with the user's), its known answer if any, the user's own reply if any."""

    prompt: Turns
    answer: str | None = None
    reply: str | None = None
    source: str = ""


def _item(obj: dict, source: str) -> RetainItem:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: a retain record must be a JSON object")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{source}: 'answer' must be a string")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                             and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"{source}: 'messages' must be a non-empty list of {{role, content}} strings")
        turns = tuple((m["role"], m["content"]) for m in msgs)
        reply = None
        if turns[-1][0] == "assistant":
            turns, reply = turns[:-1], turns[-1][1]
        if not turns or turns[-1][0] != "user":
            raise DataError(f"{source}: the prompt must end with a user turn")
        return RetainItem(turns, answer, reply, source)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{source}: a retain record needs a non-empty 'prompt' (or 'messages')")
    reply = obj.get("completion")
    if reply is not None and not isinstance(reply, str):
        raise DataError(f"{source}: 'completion' must be a string")
    return RetainItem((("user", prompt),), answer, reply, source)


def load_retain(path: str | None = None, *, default: Path = BUNDLED, key: str = "forget.retain") -> list[RetainItem]:
    """The retain set from `path`, or the bundled `default` when `path` is empty (`key` names the setting)."""
    p = Path(path) if path else default
    if not p.is_file():
        raise DataError(f"{key}: file not found: {p}")
    items = [_item(obj, f"{p}:{line}") for line, obj in iter_json(str(p))]
    if not items:
        raise DataError(f"{key}: {p} holds no records")
    return items


def item_json(item: RetainItem) -> dict:
    """JSON form of an item (for the replies cache)."""
    return {"prompt": [list(t) for t in item.prompt], "answer": item.answer}


def prompt_key(item: RetainItem) -> str:
    return json.dumps([list(t) for t in item.prompt], ensure_ascii=False)
