"""The retrieval rows end to end on a tiny run: eval.documents' passages in the base + retrieval and the
fine-tuned + retrieval prompts (the ones a direct bm25s query picks), their costs, and the verdict of those figures;
a bad document fails before training with its file:line."""

from __future__ import annotations

import json

import bm25s
import pytest

from data_helpers import write_jsonl
from ftjax.errors import DataError
from ftjax.evaluation.conversations import load_records, split_reply
from ftjax.evaluation.report_notes import retrieval_note
from ftjax.evaluation.retrieval import Passage, with_passages
from ftjax.evaluation.verdict import rows_of, verdict
from ftjax.train.loop import run
from loop_helpers import load_config


def _handbook(eval_path):
    """One document per eval person (their reference as text) and as many unrelated ones."""
    people = [split_reply(r)[1] for r in load_records(eval_path)]
    return ([{"id": f"p{i}", "text": f"Record: {p}"} for i, p in enumerate(people)]
            + [{"id": f"x{i}", "text": f"Shipping note {i}: parcel weighs {i * 7} grams."} for i in range(16)])


@pytest.mark.slow
def test_documents_reach_both_retrieval_rows_and_the_verdict_reads_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    c = load_config()
    c.train.steps, c.checkpoint.every = 2, 0
    docs = _handbook(c.data.eval)
    c.eval.documents = write_jsonl(tmp_path / "docs.jsonl", docs)
    c.eval.few_shot = 2
    workdir = tmp_path / "run"
    run(c, workdir)

    report = json.loads((workdir / "report.json").read_text())
    rows = ("base", "prompted", "retrieval", "finetuned", "finetuned_retrieval")
    assert list(report["task"]) == list(rows)
    first = split_reply(load_records(c.data.eval)[0])[0]
    retriever = bm25s.BM25()  # the passages a direct bm25s query picks for the first eval question
    retriever.index(bm25s.tokenize([d["text"] for d in docs]))
    found, _ = retriever.retrieve(bm25s.tokenize([first[-1][1]]), k=2, backend_selection="numpy")
    asked = with_passages(first, [Passage(docs[i]["id"], docs[i]["text"]) for i in found[0]])[-1][1]
    assert report["samples"]["retrieval"]["prompt"] == report["samples"]["finetuned_retrieval"]["prompt"] == asked
    tokens = {w: report["task"][w]["prompt_tokens"] for w in rows}
    assert tokens["base"] == tokens["finetuned"] < tokens["retrieval"] == tokens["finetuned_retrieval"]
    assert all(report["task"][w]["seconds_per_query"] > 0 for w in rows)
    assert report["meta"]["retrieval"]["from"] == "documents" and report["meta"]["retrieval"]["k"] == 2

    md = (workdir / "report.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| task"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == ["base + retrieval", "fine-tuned",
                                                                      "fine-tuned + retrieval"]
    assert "\n".join(retrieval_note(report["meta"]["retrieval"])) in md  # the template, as a user reads it
    assert "```\nAnswer using these passages.\n\n[1] {passage}\n\n[2] {passage}\n\nQuestion: {question}\n```" in md
    sentence = verdict(rows_of(report, "exact"))
    assert sentence and report["verdict"] == sentence and md.endswith(f"## Verdict\n\n{sentence}\n\n")
    phases = [p["phase"] for p in report["meta"]["phases"]]
    assert any(p.startswith("fine-tuned model + retrieval on ") for p in phases)


def test_a_bad_document_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    c = load_config()
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "first"}\n{"id": "a", "text": "again"}\n')
    c.eval.documents = str(path)
    with pytest.raises(DataError, match=r"docs.jsonl:2: document id 'a' repeats the one at line 1"):
        run(c, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
