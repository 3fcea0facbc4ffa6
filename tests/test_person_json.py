"""The demo task's generator and scorer against hand-written cases."""

import json

from ftjax.tasks import person_json


def test_splits_are_disjoint_reproducible_and_well_formed():
    train, evals = person_json.split(500, 100, seed=3)
    again, _ = person_json.split(500, 100, seed=3)
    assert train == again
    sentences = lambda rs: {r["messages"][0]["content"] for r in rs}  # noqa: E731
    assert not sentences(train) & sentences(evals)
    for r in train + evals:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        obj = json.loads(assistant["content"])
        assert tuple(obj) == person_json.KEYS
        sentence = user["content"].split("\n", 1)[1]
        assert obj["name"] in sentence and obj["job"] in sentence and obj["city"] in sentence
        assert str(obj["age"]) in sentence


def test_score_exact_and_json_valid():
    expected = '{"name": "Ana Silva", "age": 31, "job": "chef", "city": "Porto"}'
    assert person_json.score(expected, expected) == {"exact": 1.0, "json_valid": 1.0}
    spaced = 'Here you go: {"age":31,"name":"Ana Silva","job":"chef","city":"Porto"} done'
    assert person_json.score(spaced, expected) == {"exact": 1.0, "json_valid": 1.0}
    wrong = '{"name": "Ana Silva", "age": "31", "job": "chef", "city": "Porto"}'
    assert person_json.score(wrong, expected) == {"exact": 0.0, "json_valid": 1.0}
    assert person_json.score("Ana Silva is a chef {not json", expected) == {"exact": 0.0, "json_valid": 0.0}
