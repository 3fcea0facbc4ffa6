"""Sources: mixture weights, held-out eval by seed, train/eval duplicates, fingerprints, the token cache,
and the TFDS builder (JSONL -> ArrayRecord, read back without TensorFlow)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from data_helpers import chat, data_config, data_part, smollm2_tokenizer, write_jsonl
from ftjax.data import build_datasets, data_fingerprints, prepare_jsonl
from ftjax.data.mixture import mixture_counts, parse_sources
from ftjax.data.token_cache import clear_memory
from ftjax.errors import DataError
from ftjax.train.compose import data_spec


def _build(train, **data):
    return build_datasets(data_part(train, seq_len=256, **data), smollm2_tokenizer())


def _source_files(rows):
    return [rows.examples.source(e).rsplit(":", 1)[0] for e in rows.items]


def test_mixture_syntax_and_weights(tmp_path):
    assert [(s.path, s.weight) for s in parse_sources("a.jsonl:0.7, b.jsonl:0.3,c.jsonl")] == \
        [("a.jsonl", 0.7), ("b.jsonl", 0.3), ("c.jsonl", 1.0)]
    assert [(s.path, s.weight) for s in parse_sources("/data/x:y.jsonl")] == [("/data/x:y.jsonl", 1.0)]
    assert mixture_counts([30, 10], [0.5, 0.5]) == [20, 20]
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(100 + i) for i in range(10)])
    data = _build(f"{a}:3,{b}:1", packing=False)
    files = _source_files(data.train)
    assert files.count(a) == 30 and files.count(b) == 10 and data.summary.train_examples == 40
    data = _build(f"{a}:1,{b}:1", packing=False)  # b is repeated to fill half, a subsampled to 20 of 30
    files = _source_files(data.train)
    assert files.count(a) == 20 and files.count(b) == 20
    lines_a = {data.train.examples.source(e) for e, f in zip(data.train.items, files) if f == a}
    assert len(lines_a) == 20  # subsampled without repeats
    assert [s["examples"] for s in data.summary.sources] == [20, 20]
    with pytest.raises(DataError, match="names a file twice"):
        parse_sources("a.jsonl:1,a.jsonl:2")


def test_held_out_eval_by_seed_and_duplicates(tmp_path):
    recs = [chat(i) for i in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    data = _build(path, eval_fraction=0.25)
    train_src = {data.train.examples.source(e) for e in data.train.items}
    eval_src = {data.eval.examples.source(e) for e in data.eval.items}
    assert len(train_src) == 30 and len(eval_src) == 10 and not train_src & eval_src
    assert data.summary.duplicates_train_eval == 0
    again = _build(path, eval_fraction=0.25)
    assert {again.eval.examples.source(e) for e in again.eval.items} == eval_src  # same seed, same split
    c = data_config(path, seq_len=256, eval_fraction=0.25)
    c.seed = 1
    other = build_datasets(data_spec(c), smollm2_tokenizer())
    assert {other.eval.examples.source(e) for e in other.eval.items} != eval_src
    # a separate eval file that repeats 3 train records exactly (and one twice within itself)
    ev = write_jsonl(tmp_path / "eval.jsonl", [recs[0], recs[5], recs[7], chat(500), chat(501), recs[5]])
    summary = _build(path, eval=ev).summary
    assert summary.duplicates_train_eval == 4 and summary.eval_examples == 6
    dup = write_jsonl(tmp_path / "dup.jsonl", recs + recs[:3])
    assert _build(dup).summary.duplicates_train == 3


def test_fingerprints_name_every_file_and_change_with_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(5)])
    ev = write_jsonl(tmp_path / "e.jsonl", [chat(9)])
    c = data_config(a, seq_len=256)
    c.data.eval = ev
    fps = data_fingerprints(data_spec(c))
    for p in (a, ev):
        raw = open(p, "rb").read()
        assert fps[p] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert build_datasets(data_spec(c), smollm2_tokenizer()).summary.fingerprints == fps
    write_jsonl(a, [chat(i) for i in range(6)])
    assert data_fingerprints(data_spec(c))[a] != fps[a]


def test_tokenized_once_then_read_from_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(i, turns=2) for i in range(20)])
    cache = str(tmp_path / "cache")
    first = _build(path, cache_dir=cache)
    assert len(os.listdir(cache)) == 1

    class NoTemplateCalls:  # same vocabulary and template hash, but rendering is forbidden
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __len__(self):
            return len(self._tok)

        def apply_chat_template(self, *a, **k):
            raise AssertionError("tokenized again")

        def __call__(self, *a, **k):
            raise AssertionError("tokenized again")

    clear_memory()
    again = build_datasets(data_part(path, seq_len=256, cache_dir=cache), NoTemplateCalls(smollm2_tokenizer()))
    for f in ("ids", "trained", "starts", "lengths", "digests", "origin", "lines", "origins"):
        np.testing.assert_array_equal(getattr(again.train.examples, f), getattr(first.train.examples, f))
    np.testing.assert_array_equal(again.train.items, first.train.items)
    write_jsonl(path, [chat(i, turns=2) for i in range(21)])  # changed data: a new cache entry
    assert _build(path, cache_dir=cache).summary.train_examples == 21
    assert len(os.listdir(cache)) == 2


def test_tfds_builder_roundtrip_without_tensorflow(tmp_path):
    recs = [chat(i, turns=1 + i % 2) for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", recs)
    ev = write_jsonl(tmp_path / "eval.jsonl", [chat(100 + i) for i in range(4)])
    data_dir = str(tmp_path / "tfds")
    folder = prepare_jsonl({"train": [train], "validation": [ev]}, data_dir)
    assert any(f.startswith("jsonl_records-train.array_record") for f in os.listdir(folder))
    assert prepare_jsonl({"train": [train], "validation": [ev]}, data_dir) == folder  # unchanged: reused
    c = data_config(None, seq_len=256, tfds_name="jsonl_records", tfds_data_dir=data_dir,
                    tfds_eval_split="validation")
    from_tfds = build_datasets(data_spec(c), smollm2_tokenizer())
    from_jsonl = build_datasets(data_part(train, seq_len=256, eval=ev), smollm2_tokenizer())
    for a, b in ((from_tfds.train, from_jsonl.train), (from_tfds.eval, from_jsonl.eval)):
        assert [a.examples.source(e) for e in range(len(a.examples))] == \
            [b.examples.source(e) for e in range(len(b.examples))]  # original file:line kept, same order
        np.testing.assert_array_equal(a.examples.ids, b.examples.ids)
        np.testing.assert_array_equal(a.examples.trained, b.examples.trained)
    assert "tfds:jsonl_records/train" in from_tfds.summary.fingerprints
    # a bad record read back from ArrayRecord still names the user's file and line
    write_jsonl(train, recs[:3] + [{"messages": [{"role": "assistant", "content": "x"}]}])
    prepare_jsonl({"train": [train]}, data_dir)
    with pytest.raises(DataError, match=rf"^{train}:4: messages\[0\]\.role is 'assistant'"):
        build_datasets(data_spec(c), smollm2_tokenizer())
    c.data.tfds_name = "jsonl_records"
    c.data.tfds_eval_split = None
    c.data.train = train
    with pytest.raises(DataError, match="either data.train"):
        build_datasets(data_spec(c), smollm2_tokenizer())
