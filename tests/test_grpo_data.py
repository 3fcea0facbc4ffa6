"""objective=grpo's inputs, checked before any compute: prompt-only records (a prompt string, or a conversation
ending with the user's turn or with a reply that is left out), a bad record naming its file:line, the `rl.*`
ranges and an unknown reward as one-line config errors; and its reward panel in the progress plot."""

import json

import pytest

from ftjax import config as config_lib
from ftjax.data.prompts import prompt_datasets
from ftjax.data.records import Fields
from ftjax.errors import ConfigError, DataError
from ftjax.evaluation.progress import panels
from ftjax.objectives import objective_for


class Tokenizer:
    """Characters as tokens; the template joins the turns as `role: content` lines."""

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + ("assistant: " if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _write(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_prompt_records_in_each_form(tmp_path):
    path = _write(tmp_path, [
        {"prompt": "2+2?", "answer": "4"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "Ada"}]}])
    data = prompt_datasets(path, None, Fields(), Tokenizer(), seq_len=128, max_new_tokens=16)
    turns = [p.messages for p in data.train]
    assert turns == [(("user", "2+2?"),), (("system", "be brief"), ("user", "hi")), (("user", "name?"),)]
    assert [p.text for p in data.train] == ["2+2?", "hi", "name?"]
    assert data.train[0].example["answer"] == "4"  # the record's fields travel to the rewards
    assert data.train[2].example["messages"][-1]["content"] == "Ada"  # the reply a reward may compare with
    assert bytes(data.train[0].tokens).decode() == "user: 2+2?\nassistant: "
    assert data.eval is None and data.summary.train_examples == 3


@pytest.mark.parametrize("record,message", [
    ({"text": "no prompt here"}, "train.jsonl:2: record has no prompt: neither 'prompt' nor 'messages'"),
    ({"prompt": ""}, "train.jsonl:2: 'prompt' must be a non-empty string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "train.jsonl:2: messages[0].role is 'assistant'"),
    ({"prompt": "x" * 200}, "train.jsonl:2: the prompt is 218 tokens; with rl.max_new_tokens the row holds 113"),
])
def test_a_bad_record_names_its_file_and_line(tmp_path, record, message):
    path = _write(tmp_path, [{"prompt": "fine"}, record])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prompt_datasets(path, None, Fields(), Tokenizer(), seq_len=128, max_new_tokens=16)


@pytest.mark.parametrize("key,value,message", [
    ("rl.num_generations", 1, "config.rl.num_generations must be >= 2"),
    ("rl.loss_type", "ppo", "config.rl.loss_type='ppo' is not one of grpo, dr_grpo, dapo, bnpo, cispo, rloo"),
    ("rl.baseline", "mean", "config.rl.baseline='mean' is not one of group, rloo"),
    ("rl.temperature", 0.0, "config.rl.temperature must be > 0"),
    ("rl.top_p", 0.0, r"config.rl.top_p must be in \(0, 1\]"),
    ("rl.epsilon_high", -1.0, "config.rl.epsilon_high must be >= 0"),
])
def test_rl_ranges_are_one_line_errors(key, value, message):
    c = config_lib.default_config()
    c.objective = "grpo"
    group, _, leaf = key.rpartition(".")
    setattr(c[group], leaf, value)
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


def test_an_unknown_reward_is_a_config_error_before_any_work():
    c = config_lib.default_config()
    c.rl.rewards = "json_fields,exact_answer=0.5"
    with pytest.raises(ConfigError, match="unknown reward 'exact_answer'; did you mean 'answer_exact'"):
        objective_for("grpo", c.rl)


def test_the_progress_plot_has_a_reward_panel():
    records = [{"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.5, "task_exact": 0.1}]
    assert [names for _, _, names in panels(records)] == [["task_exact"], ["reward"]]
