"""The retrieval baseline's selection against a direct bm25s query, its prompt layouts, and its shared cache."""

import json
import shutil

import bm25s
import numpy as np
import pytest

from data_helpers import write_jsonl
from ftjax.errors import DataError
from ftjax.evaluation import retrieval
from ftjax.evaluation.conversations import few_shot_turns, load_records, split_reply

WORDS = ("alpine aster basalt cobalt delta ember fjord garnet harbor indigo juniper kelp lagoon marble nectar "
         "onyx prairie quartz rapids sierra tundra umber valley willow xenon yarrow zephyr").split()


def _qa(rng, i):
    words = " ".join(rng.choice(WORDS, size=6))
    return {"messages": [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": f"Item {i}: which of {words} comes first?"},
                         {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    train = write_jsonl(tmp_path / "a" / "train.jsonl", [_qa(rng, i) for i in range(40)])
    evals = write_jsonl(tmp_path / "a" / "eval.jsonl", [_qa(rng, 100 + i) for i in range(12)])
    return tmp_path, train, evals


def _direct_bm25(corpus, queries, k):
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus))
    found, _ = retriever.retrieve(bm25s.tokenize(queries), k=k, backend_selection="numpy")  # its order of ties
    return found.tolist()


def _user_text(record):
    return split_reply(record)[0][1][1]


def test_shots_are_a_direct_bm25s_query_laid_out_as_few_shot(files):
    _, train_path, eval_path = files
    train, evals = load_records(train_path), load_records(eval_path)
    shots = retrieval.retrieved_shots(evals, eval_path, train, train_path, k=3)
    expected = _direct_bm25([_user_text(r) for r in train], [_user_text(r) for r in evals], 3)
    assert [[train.index(s) for s in reversed(row)] for row in shots] == expected  # the most similar nearest
    prompt = split_reply(evals[0])[0]
    turns = few_shot_turns(prompt, shots[0])
    assert turns[0] == prompt[0] and turns[-1] == prompt[-1]  # the eval system prompt first, its question last
    assert turns[1:-1] == tuple(t for s in shots[0] for t in s.messages if t[0] != "system")


def test_an_eval_prompt_seen_in_training_retrieves_that_example_nearest(files):
    _, train_path, eval_path = files
    train = load_records(train_path)
    shots = retrieval.retrieved_shots(train[5:6], train_path, train, train_path, k=2)
    assert shots[0][-1] == train[5]


def test_selection_is_shared_across_workdirs_and_selected_again_on_change(files, monkeypatch):
    root, train_path, eval_path = files
    train, evals = load_records(train_path), load_records(eval_path)
    calls = []
    real = retrieval.bm25_top_k
    monkeypatch.setattr(retrieval, "bm25_top_k", lambda *a: calls.append(a[2]) or real(*a))
    first = retrieval.retrieved_shots(evals, eval_path, train, train_path, k=3)
    other = root / "b"  # another run's folder with the same bytes under other names
    shutil.copytree(root / "a", other)
    again = retrieval.retrieved_shots(evals, str(other / "eval.jsonl"), train, str(other / "train.jsonl"), k=3)
    assert again == first and calls == [3]
    retrieval.retrieved_shots(evals, eval_path, train, train_path, k=2)
    assert calls == [3, 2]
    lines = (other / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # same records, changed file
    changed = load_records(str(other / "train.jsonl"))
    moved = retrieval.retrieved_shots(evals, str(other / "eval.jsonl"), changed, str(other / "train.jsonl"), k=3)
    assert calls == [3, 2, 3]  # selected again: indices into the old file would name other records now
    assert all(s in changed for row in moved for s in row)


def test_passages_go_into_the_question(files, tmp_path):
    _, _, eval_path = files
    evals = load_records(eval_path)
    docs_path = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _user_text(r).split(":")[1]}
                                                      for i, r in enumerate(load_records(eval_path))])
    docs = retrieval.load_documents(docs_path)
    picked = retrieval.retrieved_passages(evals, eval_path, docs, docs_path, k=2)
    expected = _direct_bm25([d.text for d in docs], [_user_text(r) for r in evals], 2)
    assert [[docs.index(p) for p in row] for row in picked] == expected
    assert picked[4][0].id == "d4"  # each question's own document is the best match
    prompt = split_reply(evals[4])[0]
    turns = retrieval.with_passages(prompt, picked[4])
    assert turns[:-1] == prompt[:-1]
    assert turns[-1] == ("user", f"Answer using these passages.\n\n[1] {picked[4][0].text}\n\n[2] {picked[4][1].text}"
                                 f"\n\nQuestion: {prompt[-1][1]}")


@pytest.mark.parametrize("line, message", [
    ('{"id": "x"}', r"docs.jsonl:2: a document needs a non-empty string \"text\""),
    ('{"text": "t"}', r"docs.jsonl:2: a document needs an \"id\""),
    ('{"id": "a", "text": "again"}', r"docs.jsonl:2: document id 'a' repeats the one at line 1"),
    ('{"id": "b", "text": ', r"docs.jsonl:2: malformed JSON"),
])
def test_bad_documents_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "first"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        retrieval.load_documents(str(path))


def test_k_beyond_the_collection_is_refused():
    with pytest.raises(DataError, match="k=3 .* size \\(2\\)"):
        retrieval.bm25_top_k(["a b", "c d"], ["a"], 3)


@pytest.mark.parametrize("eval_file, k", [(None, 2), ("eval.jsonl", 0)])
def test_documents_need_eval_questions_and_k(eval_file, k):
    from ftjax.config import default_config, validate
    from ftjax.errors import ConfigError

    c = default_config()
    c.eval.documents, c.data.eval, c.eval.few_shot = "docs.jsonl", eval_file, k
    with pytest.raises(ConfigError, match="eval.documents .* needs data.eval and eval.few_shot >= 1"):
        validate(c)
