"""Scorers against hand cases: exact, json_valid, contains, regex, task scorers, QA answers, metric lists."""

from __future__ import annotations

import re

import pytest

from ftjax.errors import ConfigError
from ftjax.evaluation.scorers import contains_answer, make_scorer, metric_names, split_metrics

PERSON = '{"name": "Ana Silva", "age": 31, "job": "nurse", "city": "Lima"}'


@pytest.mark.parametrize("metric, reply, expected, want", [
    ("exact", "Paris", "Paris", 1.0),
    ("exact", "  Paris\n", "Paris", 1.0),
    ("exact", "paris", "Paris", 0.0),
    ("exact", "Paris.", "Paris", 0.0),
    ("json_valid", PERSON, "", 1.0),
    ("json_valid", "Sure! ```json\n" + PERSON + "\n```", "", 1.0),
    ("json_valid", '{"name": "Ana", "age": }', "", 0.0),
    ("json_valid", "[1, 2, 3]", "", 0.0),
    ("json_valid", "no json here", "", 0.0),
    ("contains", "The capital is  PARIS, of course.", "capital is paris", 1.0),
    ("contains", "The capital is Lyon.", "Paris", 0.0),
    ("regex", "order 1234", r"order \d+", 1.0),
    ("regex", "my order 1234", r"order \d+", 0.0),  # the reference pattern must match the whole reply
    ("regex", "anything", "([unclosed", 0.0),  # a bad reference pattern scores 0
    (r"regex:^\{.*\}$", PERSON, "ignored", 1.0),
    (r"regex:^\{.*\}$", "x" + PERSON, "ignored", 0.0),
])
def test_generic_scorers(metric, reply, expected, want):
    name = "regex" if metric.startswith("regex:") else metric
    assert make_scorer(metric)(reply, expected) == {name: want}


def test_task_scorer_parses_json():
    """person_json compares parsed objects: key order and surrounding prose do not matter, values do."""
    score = make_scorer("person_json")
    reordered = '{"city": "Lima", "job": "nurse", "age": 31, "name": "Ana Silva"}'
    assert score("Here you go: " + reordered, PERSON) == {"exact": 1.0, "json_valid": 1.0}
    assert score(PERSON.replace("31", "32"), PERSON) == {"exact": 0.0, "json_valid": 1.0}
    assert score("Ana is 31.", PERSON) == {"exact": 0.0, "json_valid": 0.0}
    assert metric_names("person_json") == ["exact", "json_valid"]


def test_metric_lists():
    assert split_metrics("exact, json_valid") == ["exact", "json_valid"]
    assert split_metrics("contains,regex:a{1,2},b") == ["contains", "regex:a{1,2},b"]  # a fixed pattern takes the rest
    both = make_scorer("exact,contains")
    assert both("Paris!", "Paris") == {"exact": 0.0, "contains": 1.0}
    assert metric_names("exact,json_valid,contains,regex") == ["exact", "json_valid", "contains", "regex"]


@pytest.mark.parametrize("metric, fragment", [("exactly", "unknown metric 'exactly'"), ("", "eval.metric is empty"),
                                              ("regex:([", "bad regular expression")])
def test_bad_metrics_are_config_errors(metric, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        make_scorer(metric)


@pytest.mark.parametrize("reply, answer, want", [
    ("The capital of France is Paris.", "Paris", 1.0),
    ("paris", "Paris", 1.0),
    ("A week has seven days.", "seven|7", 1.0),
    ("There are 7 days.", "seven|7", 1.0),
    ("Water freezes at 0 °C.", "0", 1.0),
    ("It is 100 degrees.", "0", 0.0),  # whole words only
    ("Parisian food", "Paris", 0.0),
    ("I am not sure.", "Paris", 0.0),
    ("It is carbon  dioxide.", "carbon dioxide|CO2", 1.0),
])
def test_contains_answer(reply, answer, want):
    assert contains_answer(reply, answer) == want


@pytest.mark.parametrize("key, value, fragment", [
    ("eval.metric", "bleu", "unknown metric 'bleu'"),
    ("eval.few_shot", -1, "eval.few_shot must be >= 0"),
    ("forget.replay_fraction", 1.0, "forget.replay_fraction must be in [0, 1)"),
    ("forget.kl_weight", -0.1, "forget.kl_weight must be >= 0"),
    ("forget.l2_weight", 0.1, "forget.l2_weight applies to method=full"),
])
def test_eval_and_forget_config_checks(key, value, fragment):
    from ftjax import config as config_lib

    c = config_lib.default_config()
    group, name = key.split(".")
    c[group][name] = value
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        config_lib.validate(c)
    c.method = "full"
    if key == "forget.l2_weight":
        config_lib.validate(c)  # L2-to-base is for full fine-tuning


def test_every_declared_scorer_name_is_registered():
    """Config validation reads the names (ftjax.scorer_names); evaluation registers one scorer for each."""
    from ftjax import scorer_names

    for name in scorer_names.NAMES:
        assert callable(scorer_names.registered(name)), name
    with pytest.raises(ValueError, match="not declared"):
        scorer_names.register("undeclared_metric", lambda r, e: {})


def test_config_validation_imports_no_evaluation_code():
    """A bad eval.metric is refused by ftjax.config alone, in a fresh interpreter (no scorer imported)."""
    import subprocess
    import sys

    code = ("import sys; from ftjax import config; c = config.default_config(); c.eval.metric = 'exactly'\n"
            "try:\n    config.validate(c)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "print(sorted(m for m in sys.modules if m.startswith('ftjax.evaluation') or m == 'ftjax.tasks'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ConfigError eval.metric: unknown metric 'exactly'" in out
    assert out.strip().endswith("[]")
