"""Rewards: each bundled reward on hand examples, the `rl.rewards` spec, the batch runner, and its one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ftjax.errors import ConfigError
from ftjax.objectives import rewards
from ftjax.objectives.rewards import RewardError, parse_rewards, score_batch
from ftjax.tasks import person_json

PERSON = {"name": "Maria Khan", "age": 34, "job": "nurse", "city": "Oslo"}
RECORD = {"prompt": "Extract ...", "answer": person_json.answer(PERSON)}
CHAT_RECORD = {"messages": [{"role": "user", "content": "Extract ..."},
                            {"role": "assistant", "content": person_json.answer(PERSON)}]}


@pytest.mark.parametrize("completion, want", [
    (json.dumps(PERSON), 1.0),
    ('Sure! ```json\n{"name": "Maria Khan", "age": 34, "job": "chef", "city": "Oslo"}\n```', 0.75),
    ('{"name": "Maria", "age": "34", "job": "nurse"}', 0.25),  # age as a string is not 34
    ("no JSON here", 0.0),
    ('{"name": "Maria Khan", "age": 34, "job": "nurse", "city": "Oslo", "extra": 1}', 1.0),
])
def test_json_fields(completion, want):
    assert rewards.json_fields("p", completion, RECORD) == want
    assert rewards.json_fields("p", completion, CHAT_RECORD) == want  # the final assistant turn is the reference


def test_json_fields_agrees_with_the_task_scorer_on_whole_matches():
    for completion in (json.dumps(PERSON), '{"name": "Maria Khan"}', "nothing"):
        exact = person_json.score(completion, RECORD["answer"])["exact"]
        assert (rewards.json_fields("p", completion, RECORD) == 1.0) == bool(exact)


@pytest.mark.parametrize("completion, want", [('{"a": 1}', 1.0), ('text {"a": [1, 2]} text', 1.0),
                                              ("[1, 2]", 0.0), ("{broken", 0.0)])
def test_json_format(completion, want):
    assert rewards.json_format("p", completion, {}) == want


def test_answer_exact():
    assert rewards.answer_exact("p", " 42\n", {"answer": "42"}) == 1.0
    assert rewards.answer_exact("p", "42.0", {"answer": "42"}) == 0.0
    assert rewards.answer_exact("p", "7", {"answer": 7}) == 1.0


def test_regex():
    assert rewards.regex("p", " The answer is 12. ", {"pattern": r"The answer is \d+\."}) == 1.0
    assert rewards.regex("p", "The answer is 12. Done", {"pattern": r"The answer is \d+\."}) == 0.0  # whole reply


def test_length_penalty():
    start = rewards.LENGTH_MAX - rewards.LENGTH_CACHE
    for n, want in ((0, 0.0), (start, 0.0), (start + rewards.LENGTH_CACHE // 2, -0.5),
                    (rewards.LENGTH_MAX, -1.0), (rewards.LENGTH_MAX + 100, -1.0)):
        assert rewards.length_penalty("p", "x" * n, {}) == pytest.approx(want)


def test_spec_names_and_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompt, completion, example):\n    return -len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_rewards("json_fields, json_format=0.2,my_rewards:short=-1e-3")
    assert [(r.name, r.fn, r.weight) for r in spec[:2]] == [("json_fields", rewards.json_fields, 1.0),
                                                            ("json_format", rewards.json_format, 0.2)]
    assert spec[2].name == "my_rewards:short" and spec[2].weight == -1e-3 and spec[2].fn("p", "abc", {}) == -3


@pytest.mark.parametrize("spec, message", [
    ("json_field", r"^rl.rewards: unknown reward 'json_field'; did you mean 'json_fields'\?"),
    ("answer_exakt=2", r"^rl.rewards: unknown reward 'answer_exakt'; did you mean 'answer_exact'\?"),
    ("json_fields=high", r"^rl.rewards: the weight of 'json_fields' is 'high', not a number$"),
    ("json_fields,,regex", r"^rl.rewards='json_fields,,regex': an empty reward name"),
    ("regex,regex=2", r"^rl.rewards: 'regex' is named twice$"),
    ("no_such_module_xyz:f", r"^rl.rewards: cannot import 'no_such_module_xyz' for 'no_such_module_xyz:f' "
                             r"\(ModuleNotFoundError: .*\); is it on PYTHONPATH\?$"),
    ("json:nope", r"^rl.rewards: 'json' has no function 'nope'$"),
])
def test_bad_spec_is_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_rewards(spec)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_score_batch_totals_and_metrics():
    spec = parse_rewards("json_fields,json_format=0.5")
    completions = [json.dumps(PERSON), '{"name": "Maria Khan"}', "none", '{"city": "Oslo", "job": "nurse"}']
    scores = score_batch(spec, ["p"] * 4, completions, [RECORD] * 4)
    want = np.array([[1.0, 1.0], [0.25, 1.0], [0.0, 0.0], [0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(scores.per_function, want)
    np.testing.assert_allclose(scores.total, want @ np.array([1.0, 0.5]))
    m = scores.metrics()
    total = want @ np.array([1.0, 0.5])
    assert m["reward"] == pytest.approx(total.mean()) and m["reward_std"] == pytest.approx(np.std(total, ddof=1))
    assert m["rewards/json_fields/mean"] == pytest.approx(0.4375)
    assert m["rewards/json_format/std"] == pytest.approx(np.std([1, 1, 0, 1], ddof=1))
    assert m["reward_seconds"] >= 0.0


def test_unjudged_completion_is_nan():
    spec = [rewards.NamedReward("maybe", lambda p, c, e: None if c == "skip" else 1.0)]
    scores = score_batch(spec, ["p", "p"], ["skip", "ok"], [{}, {}])
    assert math.isnan(scores.total[0]) and scores.total[1] == 1.0


def _boom(prompt, completion, example):
    return 1.0 / len(completion)


def test_reward_that_raises_is_one_line_naming_function_and_example():
    spec = [rewards.NamedReward("json_fields", rewards.json_fields), rewards.NamedReward("mine:boom", _boom)]
    with pytest.raises(RewardError) as e:
        score_batch(spec, ["p0", "Extract the person"], ['{"a": 1}', ""], [RECORD, RECORD])
    assert str(e.value) == ("reward mine:boom raised ZeroDivisionError: float division by zero on example 1 "
                            "(prompt 'Extract the person', completion '')")
    assert e.value.exit_code == 2


def test_reward_returning_text_is_one_line():
    spec = [rewards.NamedReward("words", lambda p, c, e: "good")]
    with pytest.raises(RewardError, match=r"^reward words returned 'good', not a number, on example 0 "):
        score_batch(spec, ["p"], ["c"], [{}])


def test_errors_end_as_one_line_and_exit_2(tmp_path):
    """Through the entry points' wrapper: `error: <line>` on stderr, exit 2, no traceback."""
    (tmp_path / "bad_reward.py").write_text("def f(prompt, completion, example):\n    raise KeyError('answer')\n")
    for call in ("parse_rewards('json_feilds')",
                 "score_batch(parse_rewards('bad_reward:f'), ['p'], ['c'], [{'id': 3}])"):
        script = textwrap.dedent(f"""
            from ftjax.cli import run_main
            from ftjax.objectives.rewards import parse_rewards, score_batch
            run_main(lambda argv: {call})([])
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{sys.path[0]}"})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: rl.rewards: unknown" if "feilds" in call else
                                                       "error: reward bad_reward:f raised KeyError: 'answer'"), lines


def test_multiline_error_and_completion_stay_one_line():
    def strict(prompt, completion, example):
        raise ValueError("line one\nline two")

    with pytest.raises(RewardError) as e:
        score_batch([rewards.NamedReward("strict", strict)], ["a\nb"], ["x\n" * 50], [{}])
    assert "\n" not in str(e.value) and "line one line two" in str(e.value) and "..." in str(e.value)
