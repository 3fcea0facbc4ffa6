"""Preference pairs in TRL's formats -> two tokenized, reply-masked examples per pair, checked before compute.

Accepted records (TRL's preference formats):
- standard: `{"prompt": str, "chosen": str, "rejected": str}`, chat-templated as one user turn and the reply
  (raw prompt + reply with BOS/EOS when the tokenizer has no chat template);
- conversational: `{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}`;
- implicit prompt: `{"chosen": [messages], "rejected": [messages]}`, full conversations sharing a prefix (the
  prompt) and each ending in one differing assistant message.
Each half is tokenized by `ftjax.data.tokenize` as a conversation whose last assistant turn is trained
(`loss_on="last_assistant"`: the reply and its end-of-turn token). Bad records follow `data.on_bad_record`
(`file:line` error, or a counted skip); a pair too long for one row follows `data.overlong` as a whole.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import numpy as np

from ftjax.data.examples import Examples
from ftjax.data.records import (EMPTY_ASSISTANT, MISSING_FIELDS, WRONG_TYPE, BadRecord, ReadResult, Record,
                                checked_turns, collect, read_file)
from ftjax.data.tokenize import tokenize_records
from ftjax.errors import DataError

IDENTICAL = "identical chosen and rejected"
OVERLONG = "overlong"
NO_TRAINED = "no trained tokens"


@dataclasses.dataclass(frozen=True)
class PreferenceFields:
    """Names of the record fields."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One validated preference record as two records sharing their prompt turns."""

    source: str
    chosen: Record
    rejected: Record


def _as_list(value: Any) -> Any:
    """TFDS Sequence({role, content}) comes back as {role: [...], content: [...]}: back to a list of messages."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        keys = list(value)
        return [dict(zip(keys, vals)) for vals in zip(*(value[k] for k in keys))]
    return value


def _one_reply(msgs: Any, name: str) -> str:
    """The content of a reply given as a list of exactly one assistant message."""
    if (not isinstance(msgs, list) or len(msgs) != 1 or not isinstance(msgs[0], dict)
            or msgs[0].get("role") != "assistant" or not isinstance(msgs[0].get("content"), str)):
        raise BadRecord(WRONG_TYPE, f"'{name}' must hold exactly one {{\"role\": \"assistant\", \"content\": str}} "
                                    f"message after the prompt")
    return msgs[0]["content"]


def _split_implicit(chosen: list, rejected: list, f: PreferenceFields) -> tuple[list, list, list]:
    """(prompt, chosen reply, rejected reply) of two conversations sharing a prefix, as TRL's extract_prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) == len(rejected):
        raise BadRecord(IDENTICAL, f"'{f.chosen}' and '{f.rejected}' are the same conversation")
    return chosen[:k], chosen[k:], rejected[k:]


def validate_pair(obj: Any, source: str, f: PreferenceFields) -> Pair:
    """The pair as two records (chosen, rejected), or BadRecord saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise BadRecord(WRONG_TYPE, f"record is a JSON {type(obj).__name__}, expected an object")
    missing = [k for k in (f.chosen, f.rejected) if k not in obj]
    if missing:
        raise BadRecord(MISSING_FIELDS, f"record is missing '{missing[0]}' (a preference record needs "
                                        f"'{f.chosen}' and '{f.rejected}', and '{f.prompt}' unless both are "
                                        f"conversations sharing the prompt)")
    chosen, rejected = _as_list(obj[f.chosen]), _as_list(obj[f.rejected])
    prompt = _as_list(obj.get(f.prompt))
    if isinstance(chosen, str) or isinstance(rejected, str):
        if prompt is None:
            raise BadRecord(MISSING_FIELDS, f"record is missing '{f.prompt}' (string replies need an explicit "
                                            f"prompt; implicit prompts are for message lists)")
        for k, v in ((f.prompt, prompt), (f.chosen, chosen), (f.rejected, rejected)):
            if not isinstance(v, str):
                raise BadRecord(WRONG_TYPE, f"'{k}' is a {type(v).__name__}; with string replies every field is "
                                            f"a string")
        turns: list = [("user", prompt)]
        kind = "completion"
    else:
        if prompt is None:
            if not isinstance(chosen, list) or not isinstance(rejected, list):
                raise BadRecord(WRONG_TYPE, f"'{f.chosen}' and '{f.rejected}' must be strings or message lists")
            prompt, chosen, rejected = _split_implicit(chosen, rejected, f)
        if not isinstance(prompt, list) or not prompt:
            raise BadRecord(WRONG_TYPE, f"'{f.prompt}' must be a non-empty list of messages when the replies are "
                                        f"message lists")
        chosen, rejected = _one_reply(chosen, f.chosen), _one_reply(rejected, f.rejected)
        msgs = prompt + [{"role": "assistant", "content": chosen}]
        turns = list(checked_turns(msgs, f.prompt)[:-1])  # roles alternate and the prompt ends with a user turn
        kind = "chat"
    for k, v in ((f.chosen, chosen), (f.rejected, rejected)):
        if not v.strip():
            raise BadRecord(EMPTY_ASSISTANT, f"'{k}' is empty")
    if chosen == rejected:
        raise BadRecord(IDENTICAL, f"'{f.chosen}' and '{f.rejected}' are the same reply")
    make = lambda reply: Record(source, kind, tuple(turns) + (("assistant", reply),))  # noqa: E731
    return Pair(source, make(chosen), make(rejected))


def read_pairs(path: str, fields: PreferenceFields = PreferenceFields(), on_bad_record: str = "error") -> ReadResult:
    """All preference records of one JSONL / JSON file, validated (`records` holds Pairs)."""
    return read_file(path, fields, on_bad_record, validate_pair)


def read_pairs_tfds(name: str, split: str, data_dir: str | None, fields: PreferenceFields = PreferenceFields(),
                    on_bad_record: str = "error") -> ReadResult:
    """All preference records of a TFDS split (e.g. `prepare_jsonl`'s jsonl_records), validated like a file's."""
    from ftjax.data.records import Fields
    from ftjax.data.tfds_source import iter_tfds

    return collect(iter_tfds(name, split, data_dir, Fields()), fields, on_bad_record, validate_pair)


@dataclasses.dataclass
class PairExamples:
    """Tokenized pairs: pair i is (chosen[i], rejected[i]), each a whole half (prompt + reply)."""

    chosen: Examples
    rejected: Examples

    def __len__(self) -> int:
        return len(self.chosen)

    def take(self, index: np.ndarray | Sequence[int]) -> "PairExamples":
        return PairExamples(self.chosen.take(index), self.rejected.take(index))

    def positions(self) -> np.ndarray:
        """Row positions each pair fills (both halves: n − 1 each)."""
        return (self.chosen.lengths - 1) + (self.rejected.lengths - 1)


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Any) -> PairExamples:
    """Both halves of every pair, chat-templated, trained on the reply (and its end-of-turn token) only."""
    return PairExamples(tokenize_records([p.chosen for p in pairs], tokenizer, "last_assistant"),
                        tokenize_records([p.rejected for p in pairs], tokenizer, "last_assistant"))


def _cut(chosen_positions: np.ndarray, rejected_positions: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions per half after truncation so the pair fits one row: each half keeps at least half the row,
    or all of itself, and the longer one gives up the rest."""
    half = seq_len // 2
    c = np.minimum(chosen_positions, np.maximum(half, seq_len - rejected_positions))
    return c, np.minimum(rejected_positions, seq_len - c)


def fit_pairs(pairs: PairExamples, seq_len: int, overlong: str, dropped: collections.Counter, first: dict
              ) -> tuple[PairExamples, int]:
    """Apply data.overlong to whole pairs (a pair must fit one row: both halves together ≤ seq_len positions),
    then drop pairs where either half has no trained target left. Returns (pairs kept, pairs truncated)."""
    over = pairs.positions() > seq_len
    truncated = 0
    if over.any():
        k = int(np.flatnonzero(over)[0])
        if overlong == "error":
            raise DataError(f"{pairs.chosen.source(k)}: the pair needs {int(pairs.positions()[k])} positions (chosen "
                            f"and rejected, each prompt + reply, in one row), more than data.seq_len={seq_len}; set "
                            f"data.overlong=drop or truncate, or raise data.seq_len")
        if overlong == "truncate":
            c, r = _cut(pairs.chosen.lengths - 1, pairs.rejected.lengths - 1, seq_len)
            pairs = PairExamples(pairs.chosen.with_lengths(c + 1), pairs.rejected.with_lengths(r + 1))
            truncated = int(over.sum())
        else:
            dropped[OVERLONG] += int(over.sum())
            first.setdefault(OVERLONG, pairs.chosen.source(k))
            pairs = pairs.take(np.flatnonzero(~over))
    empty = (pairs.chosen.trained_targets() <= 0) | (pairs.rejected.trained_targets() <= 0)
    if empty.any():
        dropped[NO_TRAINED] += int(empty.sum())
        first.setdefault(NO_TRAINED, pairs.chosen.source(int(np.flatnonzero(empty)[0])))
        pairs = pairs.take(np.flatnonzero(~empty))
    return pairs, truncated
