"""Read JSON Lines / JSON array files into validated records, each tagged with its `file:line`.

Every problem is found here, before any tokenization or compute: a malformed JSON line is always an
error; a record with missing fields, a wrong role order or empty assistant content is an error, or with
`on_bad_record="skip"` it is skipped and counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Iterator

from ftjax.errors import DataError

ROLES = ("system", "user", "assistant")

# Reasons a record is skipped (keys of the dropped counts in the summary).
MISSING_FIELDS = "missing fields"
WRONG_TYPE = "wrong field type"
UNKNOWN_ROLE = "unknown role"
ROLE_ORDER = "wrong role order"
EMPTY_ASSISTANT = "empty assistant content"
EMPTY_TEXT = "empty text"


UNFINISHED = "unfinished"  # record key: the final reply was cut short


@dataclasses.dataclass(frozen=True)
class Fields:
    """Names of the record fields (configurable: `data.messages_field` etc.)."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated example. kind: "chat" (messages), "completion" (prompt + completion) or "text"."""

    source: str  # "file:line"
    kind: str
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); for "completion": (user, assistant)
    text: str = ""
    # the final reply was cut short (`"unfinished": true`, e.g. by a generation budget): its end-of-turn
    # token is not trained, so the model does not learn to stop where the cut fell
    unfinished: bool = False

    def canonical(self) -> str:
        """A stable string of the content (for exact-duplicate detection and hashing)."""
        return json.dumps([self.kind, self.messages, self.text] + ([True] if self.unfinished else []),
                          ensure_ascii=False)


class BadRecord(Exception):
    """A record that fails validation; `reason` is one of the counted reasons above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class ReadResult:
    """Records kept from one source, and the skipped ones counted by reason (first source of each)."""

    records: list[Record]
    total: int
    dropped: collections.Counter
    first_dropped: dict[str, str]


def iter_json(path: str) -> Iterator[tuple[int, Any]]:
    """(line, object) for each record of a JSON Lines file or a JSON array file; DataError names file:line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    if text.lstrip()[:1] == "[":
        yield from _iter_json_array(path, text)
        return
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None


def _iter_json_array(path: str, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder, pos, line, n = json.JSONDecoder(), text.index("[") + 1, 1, len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        line = line_of(pos)
        yield line, obj
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path}:{line_of(pos + 1)}: malformed JSON: extra data after the array")
            return
        raise DataError(f"{path}:{line_of(pos)}: malformed JSON: expected ',' or ']' in the array")


def validate(obj: Any, source: str, fields: Fields) -> Record:
    """The record in normal form, or BadRecord saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise BadRecord(WRONG_TYPE, f"record is a JSON {type(obj).__name__}, expected an object")
    unfinished = obj.get(UNFINISHED, False) if isinstance(obj, dict) else False
    if not isinstance(unfinished, bool):
        raise BadRecord(WRONG_TYPE, f"'{UNFINISHED}' is a {type(unfinished).__name__}, expected true or false")
    if unfinished and fields.text in obj and fields.messages not in obj and fields.prompt not in obj:
        raise BadRecord(WRONG_TYPE, f"'{UNFINISHED}' applies to a reply (messages or prompt/completion), "
                                    f"not to '{fields.text}' records")
    if fields.messages in obj:
        return Record(source, "chat", checked_turns(obj[fields.messages], fields.messages), unfinished=unfinished)
    if fields.prompt in obj or fields.completion in obj:
        missing = [k for k in (fields.prompt, fields.completion) if k not in obj]
        if missing:
            raise BadRecord(MISSING_FIELDS, f"record is missing '{missing[0]}'")
        prompt, completion = obj[fields.prompt], obj[fields.completion]
        for k, v in ((fields.prompt, prompt), (fields.completion, completion)):
            if not isinstance(v, str):
                raise BadRecord(WRONG_TYPE, f"'{k}' is a {type(v).__name__}, expected a string")
        if not completion.strip():
            raise BadRecord(EMPTY_ASSISTANT, f"'{fields.completion}' is empty")
        return Record(source, "completion", (("user", prompt), ("assistant", completion)), unfinished=unfinished)
    if fields.text in obj:
        text = obj[fields.text]
        if not isinstance(text, str):
            raise BadRecord(WRONG_TYPE, f"'{fields.text}' is a {type(text).__name__}, expected a string")
        if not text.strip():
            raise BadRecord(EMPTY_TEXT, f"'{fields.text}' is empty")
        return Record(source, "text", text=text)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise BadRecord(MISSING_FIELDS, f"record has none of the fields '{fields.messages}', '{fields.prompt}'+"
                                    f"'{fields.completion}' or '{fields.text}' (it has {keys})")


def checked_turns(msgs: Any, name: str) -> tuple[tuple[str, str], ...]:
    """A record's `msgs` as (role, content) turns, checked: they alternate user/assistant after an optional system
    message and end with the assistant; `name` (the field) is what a BadRecord names."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(WRONG_TYPE, f"'{name}' must be a non-empty list of {{role, content}} objects")
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord(MISSING_FIELDS, f"{name}[{k}] needs 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRecord(WRONG_TYPE, f"{name}[{k}]: 'role' and 'content' must be strings")
        if role not in ROLES:
            raise BadRecord(UNKNOWN_ROLE, f"{name}[{k}].role is {role!r}, expected one of {', '.join(ROLES)}")
        turns.append((role, content))
    first = 1 if turns[0][0] == "system" else 0
    for k in range(first, len(turns)):
        want = "user" if (k - first) % 2 == 0 else "assistant"
        if turns[k][0] != want:
            raise BadRecord(ROLE_ORDER, f"{name}[{k}].role is {turns[k][0]!r}, expected {want!r} (turns alternate "
                                        f"user/assistant after an optional first system message)")
        if want == "assistant" and not turns[k][1].strip():
            raise BadRecord(EMPTY_ASSISTANT, f"{name}[{k}] (assistant) has empty content")
    if turns[-1][0] != "assistant":
        raise BadRecord(ROLE_ORDER, f"the last message is {turns[-1][0]!r}; a conversation must end with the "
                                    f"assistant's reply")
    return tuple(turns)


def collect(items: Iterable[tuple[str, Any]], fields: Any, on_bad_record: str,
            validator: Callable[[Any, str, Any], Any] | None = None) -> ReadResult:
    """Validate (source, object) pairs with `validator` (default `validate`; preference pairs bring their own):
    raise on the first bad one, or skip and count by reason."""
    validator = validator or validate
    out = ReadResult([], 0, collections.Counter(), {})
    for source, obj in items:
        out.total += 1
        try:
            out.records.append(validator(obj, source, fields))
        except BadRecord as e:
            if on_bad_record != "skip":
                raise DataError(f"{source}: {e.detail} (set data.on_bad_record=skip to skip and count such "
                                f"records)") from None
            out.dropped[e.reason] += 1
            out.first_dropped.setdefault(e.reason, source)
    return out


def check_data_file(path: str) -> None:
    """A data path must be a readable, non-empty file: one line naming the path otherwise, before any work."""
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a data file (give a .jsonl or .json file; a prepared "
                        "TFDS dataset goes in data.tfds_name)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")


def read_file(path: str, fields: Any, on_bad_record: str = "error",
              validator: Callable[[Any, str, Any], Any] | None = None) -> ReadResult:
    """All records of one JSONL / JSON file, validated (by `validator`, as `collect`)."""
    check_data_file(path)
    result = collect(((f"{path}:{line}", obj) for line, obj in iter_json(path)), fields, on_bad_record, validator)
    if result.total == 0:
        raise DataError(f"{path}: holds no records (only blank lines or an empty JSON array)")
    return result
