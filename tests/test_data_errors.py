"""Bad input is caught before any compute, with file:line and the reason, or skipped and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_helpers import chat, data_part, smollm2_tokenizer, write_jsonl
from ftjax.data import build_datasets
from ftjax.errors import DataError

BAD = {  # line content -> counted reason
    "missing": ({"messages": [{"role": "user"}]}, "missing fields"),
    "no_fields": ({"question": "x"}, "missing fields"),
    "half_pair": ({"prompt": "x"}, "missing fields"),
    "assistant_first": ({"messages": [{"role": "assistant", "content": "hi"}]}, "wrong role order"),
    "two_users": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}]}, "wrong role order"),
    "ends_with_user": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}]}, "wrong role order"),
    "late_system": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                  {"role": "assistant", "content": "c"}]}, "wrong role order"),
    "empty_reply": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
                    "empty assistant content"),
    "empty_completion": ({"prompt": "a", "completion": ""}, "empty assistant content"),
    "bad_role": ({"messages": [{"role": "tool", "content": "a"}]}, "unknown role"),
    "not_object": (["a", "b"], "wrong field type"),
}


def _build(path, **data):
    return build_datasets(data_part(str(path), seq_len=256, **data), smollm2_tokenizer(), vocab_size=49152)


def test_malformed_json_names_file_line_and_problem(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(5)], {3: '{"messages": [}'})
    for mode in ("error", "skip"):  # a broken line is never skipped silently
        with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON: Expecting value \(column 15\)$"):
            _build(path, on_bad_record=mode)


def test_json_array_file_errors_name_the_line(tmp_path):
    good = json.dumps([chat(0), chat(1)], indent=1)
    path = tmp_path / "a.json"
    path.write_text(good)
    assert _build(path).summary.train_examples == 2
    lines = good.split("\n")
    second = next(k for k, line in enumerate(lines) if line.startswith(" {")) + 1  # first record's line
    path.write_text(good.replace('"user"', '"usr"', 1))
    with pytest.raises(DataError, match=rf"^{path}:{second}: messages\[0\]\.role is 'usr'"):
        _build(path)
    path.write_text(good.replace('"role": "user"', '"role": "user",,', 1))
    bad_line = next(k for k, line in enumerate(lines) if '"role": "user"' in line) + 1
    with pytest.raises(DataError, match=rf"^{path}:{bad_line}: malformed JSON"):
        _build(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_record_is_an_error_with_file_line(tmp_path, case):
    record, reason = BAD[case]
    path = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(4)] + [record] + [chat(9)])
    with pytest.raises(DataError, match=rf"^{path}:5: .*data.on_bad_record=skip"):
        _build(path)


def test_skipped_records_are_counted_by_reason(tmp_path):
    bad = [BAD[c] for c in sorted(BAD)]
    recs = [chat(i) for i in range(60)] + [r for r, _ in bad]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    summary = _build(path, on_bad_record="skip", max_dropped_fraction=0.2).summary
    want = {}
    for _, reason in bad:
        want[reason] = want.get(reason, 0) + 1
    assert summary.dropped == want
    assert summary.records == len(recs) and summary.train_examples == 60
    assert summary.first_dropped["unknown role"] == f"{path}:{61 + sorted(BAD).index('bad_role')}"
    # the same data with the default limit (10%) stops the run and says why
    with pytest.raises(DataError, match=rf"11 of 71 records were dropped \(15.5%\), more than "
                                        rf"data.max_dropped_fraction=0.1: .*wrong role order: 4"):
        _build(path, on_bad_record="skip")


def _long(i: int, words: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell me story {i}."},
                         {"role": "assistant", "content": " ".join(["word"] * words)}]}


def test_overlong_drop_truncate_error(tmp_path):
    recs = [chat(i) for i in range(30)] + [_long(i, 400) for i in range(2)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    dropped = _build(path).summary  # default: drop
    assert dropped.dropped == {"overlong": 2} and dropped.train_examples == 30 and dropped.truncated == 0
    with pytest.raises(DataError, match=rf"^{path}:31: example has \d+ tokens, more than data.seq_len=256"):
        _build(path, overlong="error")
    data = _build(path, overlong="truncate", packing=False)
    assert data.summary.dropped == {} and data.summary.truncated == 2 and data.summary.train_examples == 32
    ex = data.train.examples
    long_ones = np.flatnonzero(ex.lines >= 31)
    np.testing.assert_array_equal(ex.lengths[long_ones], 257)  # seq_len + 1 tokens fill one row exactly
    full_rows = [r for r in range(len(data.train)) if data.train.row_items(r)[0] in long_ones]
    b = data.train.batch(full_rows)
    assert (b["segment_ids"] == 1).all() and b["loss_weights"].sum() > 200


def test_truncation_that_leaves_nothing_to_train_drops_the_example(tmp_path):
    prompt_heavy = {"messages": [{"role": "user", "content": " ".join(["word"] * 400)},
                                 {"role": "assistant", "content": "Short."}]}
    path = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(30)] + [prompt_heavy])
    summary = _build(path, overlong="truncate").summary
    assert summary.dropped == {"no trained tokens": 1} and summary.first_dropped["no trained tokens"] == f"{path}:31"


def test_token_ids_beyond_the_model_vocab_are_an_error(tmp_path):
    tok = smollm2_tokenizer()
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a b"}, {"text": "zebra quagga okapi"}])
    limit = max(tok("a b")["input_ids"] + [tok.eos_token_id]) + 1  # line 1 fits, line 2 does not
    first_bad = next(i for i in tok("zebra quagga okapi")["input_ids"] if i >= limit)
    with pytest.raises(DataError, match=rf"^{path}:2: token id {first_bad} is outside the model's vocabulary "
                                        rf"\(size {limit}\)"):
        build_datasets(data_part(path, seq_len=64), tok, vocab_size=limit)
    assert build_datasets(data_part(path, seq_len=64), tok, vocab_size=len(tok)).summary.train_examples == 2


def test_encoding_missing_file_and_bad_weights(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps(chat(0)).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        _build(path)
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        _build(tmp_path / "nope.jsonl")
    good = write_jsonl(tmp_path / "b.jsonl", [chat(0)])
    with pytest.raises(DataError, match="weight of .* must be a positive number"):
        _build(f"{good}:-1")


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.mkdir(), "is a directory, not a data file"),
    (lambda p: p.write_text(""), "the file is empty"),
    (lambda p: p.write_text("\n\n  \n"), "holds no records"),
    (lambda p: p.write_text("[]"), "holds no records"),
])
def test_unusable_data_paths_fail_in_one_line_naming_the_path(tmp_path, make, reason):
    path = tmp_path / "train.jsonl"
    make(path)
    with pytest.raises(DataError, match=rf"^{path}: {reason}"):
        _build(path)


def test_unreadable_data_file_fails_in_one_line_naming_the_path(tmp_path, monkeypatch):
    import os

    from ftjax.data import records

    path = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(3)])
    os.chmod(path, 0)
    real_access = os.access  # root reads a mode-000 file anyway: deny as an ordinary user would be denied
    monkeypatch.setattr(records.os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode))
    with pytest.raises(DataError, match=rf"^{path}: not readable"):
        _build(path)
