"""Records from a prepared TFDS dataset (by name and data_dir), read as a random-access ArrayRecord source.

Examples written by ftjax's own builder (`jsonl_records`) carry their original JSON and `file:line`;
any other dataset's examples are taken as records directly (bytes decoded as UTF-8, a sequence of
{role, content} dicts turned back into a list of messages).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from ftjax.data.fingerprint import dir_fingerprint
from ftjax.data.records import Fields, ReadResult, collect
from ftjax.errors import DataError

_READ_CHUNK = 1024


def _source(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    import ftjax.data.tfds_jsonl  # noqa: F401  (registers the jsonl_records builder)

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad version: tfds raises several types
        raise DataError(f"TFDS dataset '{name}' (data_dir={data_dir}) cannot be opened: {e}") from None
    if not builder.is_prepared():
        raise DataError(f"TFDS dataset '{name}' is not prepared in {builder.data_dir}; prepare it first "
                        f"(nothing is downloaded during training)")
    if split not in builder.info.splits:
        raise DataError(f"TFDS dataset '{name}' has no split '{split}' (it has {', '.join(builder.info.splits)})")
    return builder, builder.as_data_source(split=split)


def _decode(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return x.item() if x.ndim == 0 and x.dtype != object else [_decode(v) for v in x.tolist()]
    if isinstance(x, np.generic):
        return _decode(x.item())
    if isinstance(x, dict):
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def _as_record(ex: dict, where: str, fields: Fields) -> tuple[str, Any]:
    if set(ex) == {"json", "source"}:  # written by ftjax.data.tfds_jsonl
        source = _decode(ex["source"])
        try:
            return source, json.loads(_decode(ex["json"]))
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: malformed JSON: {e.msg}") from None
    rec = _decode(ex)
    msgs = rec.get(fields.messages)
    if isinstance(msgs, dict) and msgs and all(isinstance(v, list) for v in msgs.values()):
        keys = list(msgs)  # TFDS Sequence({role, content}) comes back as {role: [...], content: [...]}
        rec[fields.messages] = [dict(zip(keys, vals)) for vals in zip(*(msgs[k] for k in keys))]
    return where, rec


def iter_tfds(name: str, split: str, data_dir: str | None, fields: Fields) -> Iterator[tuple[str, Any]]:
    """(source, record object) for every example of the split, in stored order."""
    _, src = _source(name, split, data_dir)
    for lo in range(0, len(src), _READ_CHUNK):
        keys = list(range(lo, min(len(src), lo + _READ_CHUNK)))
        for k, ex in zip(keys, src.__getitems__(keys)):
            yield _as_record(ex, f"tfds:{name}/{split}:{k + 1}", fields)  # record number, from 1


def read_tfds(name: str, split: str, data_dir: str | None, fields: Fields, on_bad_record: str = "error") -> ReadResult:
    """All records of a TFDS split, validated like a JSONL file's."""
    return collect(iter_tfds(name, split, data_dir, fields), fields, on_bad_record)


def tfds_fingerprint(name: str, split: str, data_dir: str | None) -> dict[str, Any]:
    """Size and content hash of the prepared dataset's folder, with its name and split."""
    builder, _ = _source(name, split, data_dir)
    return {"tfds": name, "split": split, **dir_fingerprint(str(builder.data_dir))}
