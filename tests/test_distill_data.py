"""Distillation rows: the teacher's prompt is exactly the report's prompted baseline (kshot), the BM25 neighbours
without the example itself (retrieval) or a system prompt; the reply tokens are the student's on both sides."""

import numpy as np
import pytest

from ftjax.api import load_tokenizer
from ftjax.data.records import Fields
from ftjax.data.retain import as_messages
from ftjax.evaluation.conversations import few_shot_turns, load_records, pick_shots, split_reply
from ftjax.evaluation.retrieval import bm25_top_k, query_text
from ftjax.generate import encode_chat
from ftjax.objectives.distill_data import build_distill_datasets, reply_tokens
from ftjax.objectives.distill_prefix import TeacherPrefix
from ftjax.train.compose import data_spec
from distill_helpers import distill_config


def _data(prefix: str):
    c = distill_config()
    tokenizer = load_tokenizer(c.model.path)
    teacher = TeacherPrefix(prefix, c.data.train, c.eval.few_shot, c.seed, Fields())
    return c, tokenizer, teacher, build_distill_datasets(data_spec(c), c.seed, tokenizer, teacher, vocab_size=49152)


def _prompt(ex, i):
    ids, trained = ex.tokens(i)
    return ids[:int(np.argmax(trained))].tolist()


def _records_by_prompt(c, tokenizer):
    records = load_records(c.data.train)
    return {tuple(encode_chat(tokenizer, as_messages(split_reply(r)[0]))): r for r in records}, records


def test_kshot_teacher_sees_the_reports_prompted_baseline_and_the_same_reply():
    c, tokenizer, _, data = _data("kshot")
    by_prompt, records = _records_by_prompt(c, tokenizer)
    shots = pick_shots(records, c.eval.few_shot, seed=c.seed)  # as ftjax.evaluation.run.Evaluation draws them
    pairs = data.train.pairs
    for i in range(len(pairs)):
        record = by_prompt[tuple(_prompt(pairs.student, i))]
        prompted = encode_chat(tokenizer, as_messages(few_shot_turns(split_reply(record)[0], shots)))
        assert _prompt(pairs.teacher, i) == prompted
        np.testing.assert_array_equal(reply_tokens(pairs.student, i), reply_tokens(pairs.teacher, i))
    student_tokens, teacher_tokens = pairs.prompt_tokens()
    assert teacher_tokens.mean() > 1.5 * student_tokens.mean()
    teacher_len = data.train.teacher_len
    assert teacher_len % 8 == 0 and teacher_len >= pairs.teacher.lengths.max() - 1 > teacher_len - 8
    batch = data.train.batch(np.arange(4))
    assert batch["input_ids"].shape == (4, c.data.seq_len) and batch["teacher"]["input_ids"].shape == (4, teacher_len)


def test_retrieval_teacher_sees_its_bm25_neighbours_but_never_itself():
    c, tokenizer, _, data = _data("retrieval")
    by_prompt, records = _records_by_prompt(c, tokenizer)
    corpus = [query_text(split_reply(r)[0]) for r in records]
    pairs = data.train.pairs
    for i in range(0, len(pairs), 7):
        record = by_prompt[tuple(_prompt(pairs.student, i))]
        ranked = bm25_top_k(corpus, [query_text(split_reply(record)[0])], c.eval.few_shot + 1)[0]
        shots = [records[j] for j in ranked if records[j].canonical() != record.canonical()][:c.eval.few_shot]
        expected = encode_chat(tokenizer, as_messages(few_shot_turns(split_reply(record)[0], shots[::-1])))
        assert _prompt(pairs.teacher, i) == expected


def test_system_prompt_teacher_and_a_bad_prefix():
    c, tokenizer, _, data = _data("system:Reply with JSON only, keys name, age, job, city.")
    text = tokenizer.decode(_prompt(data.train.pairs.teacher, 0))
    assert "Reply with JSON only, keys name, age, job, city." in text
    assert "Reply with JSON only, keys name" not in tokenizer.decode(_prompt(data.train.pairs.student, 0))
    with pytest.raises(Exception, match="draws its examples from data.train"):
        TeacherPrefix("kshot", None, 1, 0, Fields())
