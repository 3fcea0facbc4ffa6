"""The knowledge task's invariants: held-out products never reach training, their answers are on their own page."""

import json
import re

from ftjax.evaluation import retrieval
from ftjax.evaluation.conversations import as_record, split_reply
from ftjax.tasks import product_handbook as handbook


def _product_of(question: str, names: list[str]) -> str:
    found = [n for n in names if re.search(rf"\b{n}\b", question)]
    assert len(found) == 1, question
    return found[0]


def test_splits_are_reproducible_and_held_out_products_stay_out_of_training():
    train, held_out, pages = handbook.split(30, 10, seed=4)
    assert (train, held_out, pages) == handbook.split(30, 10, seed=4)
    assert handbook.split(30, 10, seed=5)[0] != train
    products = handbook.make_products(40, seed=4)
    names = [p.product.split()[0] for p in products]
    assert len(set(names)) == 40 and len(train) == 30 * len(handbook.FACTS) and len(held_out) == 10 * len(handbook.FACTS)
    held_names = set(names[30:])
    train_text = json.dumps(train)
    assert not [n for n in held_names if re.search(rf"\b{n}\b", train_text)]
    assert {_product_of(r["messages"][0]["content"], names) for r in held_out} == held_names


def test_every_held_out_answer_is_on_exactly_its_products_page():
    train, held_out, pages = handbook.split(30, 10, seed=4)
    names = [p.product.split()[0] for p in handbook.make_products(40, seed=4)]
    assert len({d["id"] for d in pages}) == len(pages) == 40
    for record in held_out:
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        name = _product_of(question, names)
        own = [d for d in pages if re.search(rf"\b{name}\b", d["text"])]
        assert len(own) == 1 and own[0]["id"] == name.lower()  # the product is named on its own page only
        assert re.search(rf"\b{re.escape(answer)}\b", own[0]["text"])


def test_bm25_finds_each_held_out_questions_page_first():
    _, held_out, pages = handbook.split(30, 10, seed=4)
    records = [as_record(r) for r in held_out]
    queries = [retrieval.query_text(split_reply(r)[0]) for r in records]
    best = [row[0] for row in retrieval.bm25_top_k([d["text"] for d in pages], queries, 1)]
    names = [p.product.split()[0] for p in handbook.make_products(40, seed=4)]
    assert [pages[i]["id"] for i in best] == [_product_of(q, names).lower() for q in queries]


def test_files_are_the_split_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path))
    paths = handbook.files(30, 10, seed=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["train.jsonl", "eval.jsonl", "docs.jsonl"]
    for path, part in zip(paths, handbook.split(30, 10, seed=4)):
        assert [json.loads(line) for line in open(path)] == part
    assert handbook.files(30, 10, seed=4) == paths and len(retrieval.load_documents(paths[2])) == 40
