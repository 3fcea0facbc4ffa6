"""Prompt-only records for RL from the model's own samples: `{"prompt": "..."}` or `{"messages": [...]}` ending
with a user turn, plus any fields the rewards read (`answer`, `pattern`, ...). A conversation that ends with an
assistant turn is read as the prompt before it (that turn stays in the record for a reward comparing with it), so
an SFT chat file serves as RL prompts too. Every record is checked before any compute; a bad one names file:line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ftjax.data.fingerprint import file_fingerprint
from ftjax.data.records import (MISSING_FIELDS, ROLE_ORDER, WRONG_TYPE, BadRecord, Fields, checked_turns, read_file)
from ftjax.data.summary import DataSummary
from ftjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its turns (ending with the user's), its tokens, and the whole record for the rewards."""

    source: str  # file:line
    messages: tuple[tuple[str, str], ...]
    example: dict
    tokens: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """What a reward gets as the prompt: the last user turn's content."""
        return self.messages[-1][1]


@dataclasses.dataclass(frozen=True)
class PromptData:
    """The train prompts, the held-out ones (None without `data.eval`) and the summary (`Datasets`' shape)."""

    train: list[Prompt]
    eval: list[Prompt] | None
    summary: DataSummary


def validate_prompt(obj: Any, source: str, fields: Fields) -> Prompt:
    """The record as a Prompt, or BadRecord saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise BadRecord(WRONG_TYPE, f"record is a JSON {type(obj).__name__}, expected an object")
    if fields.messages in obj:
        msgs = obj[fields.messages]
        ends_with_user = isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "user"
        turns = checked_turns(msgs + [{"role": "assistant", "content": "-"}] if ends_with_user else msgs,
                              fields.messages)
        turns = turns[:-1]  # the prompt: every turn before the (given or placeholder) final reply
        if not turns or turns[-1][0] != "user":
            raise BadRecord(ROLE_ORDER, f"'{fields.messages}' holds no user turn to prompt with")
        return Prompt(source, turns, obj)
    if fields.prompt in obj:
        prompt = obj[fields.prompt]
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRecord(WRONG_TYPE, f"'{fields.prompt}' must be a non-empty string")
        return Prompt(source, (("user", prompt),), obj)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise BadRecord(MISSING_FIELDS, f"record has no prompt: neither '{fields.prompt}' nor '{fields.messages}' "
                                    f"(it has {keys}); RL training samples its replies to prompts")


def prompt_ids(tokenizer: Any, turns: Sequence[tuple[str, str]]) -> list[int]:
    """The chat template's tokens of `turns` with the generation prompt (what generation continues)."""
    msgs = [{"role": role, "content": content} for role, content in turns]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_prompts(path: str, fields: Fields, tokenizer: Any, max_prompt_tokens: int, on_bad_record: str = "error"
                 ) -> tuple[list[Prompt], int, dict]:
    """(prompts tokenized with the chat template, records read, fingerprint) of one file; a prompt longer than
    `max_prompt_tokens` (what the row leaves after the completion) names its file:line."""
    read = read_file(path, fields, on_bad_record, validator=validate_prompt)
    out = []
    for p in read.records:
        tokens = prompt_ids(tokenizer, p.messages)
        if len(tokens) > max_prompt_tokens:
            raise DataError(f"{p.source}: the prompt is {len(tokens)} tokens; with rl.max_new_tokens the row holds "
                            f"{max_prompt_tokens} (raise data.seq_len)")
        out.append(dataclasses.replace(p, tokens=tuple(tokens)))
    return out, read.total, file_fingerprint(path)


def prompt_datasets(train: str | None, eval_path: str | None, fields: Fields, tokenizer: Any, seq_len: int,
                    max_new_tokens: int, on_bad_record: str = "error") -> PromptData:
    """The train (and held-out) prompts of `data.train` / `data.eval`, all checked before any compute."""
    if not train:
        raise DataError("config.data.train is not set: RL training needs a file of prompts")
    room = seq_len + 1 - max_new_tokens
    if room < 1:
        raise DataError(f"data.seq_len={seq_len} leaves no room for a prompt before rl.max_new_tokens="
                        f"{max_new_tokens} new tokens")
    summary = DataSummary(seq_len=seq_len)
    prompts, total, fp = read_prompts(train, fields, tokenizer, room, on_bad_record)
    summary.records, summary.fingerprints[train] = total, fp
    held_out = None
    if eval_path:
        held_out, total, fp = read_prompts(eval_path, fields, tokenizer, room, on_bad_record)
        summary.records += total
        summary.fingerprints[eval_path] = fp
        summary.eval_examples = len(held_out)
    summary.train_examples = len(prompts)
    summary.dropped = {}
    return PromptData(prompts, held_out, summary)
