"""A resume is refused, in one line of words, when the run's config or provenance differs outside the
documented may-change list; what may change does not stop it."""

import pytest

from ftjax import config as config_lib
from ftjax.errors import ConfigError
from ftjax.provenance import check_resume_config, check_same


def _cfg(**changes):
    c = config_lib.default_config()
    c.unlock()
    for key, value in changes.items():
        group, name = key.split(".")
        c[group][name] = value
    return c.to_dict()


DEFAULTS = config_lib.default_config().to_dict()


@pytest.mark.parametrize("key,value", [("lora.rank", 8), ("lora.targets", "q_proj,v_proj"), ("lora.alpha", 16.0),
                                       ("model.dtype", "bfloat16"), ("train.frozen_dtype", "bfloat16"),
                                       ("optim.lr", 3e-4), ("data.seq_len", 256), ("train.frozen_quant", "nf4"),
                                       ("train.frozen_quant_scope", "all_linears")])
def test_a_changed_key_is_refused_naming_key_and_both_values(key, value):
    recorded = _cfg()
    old = recorded[key.split(".")[0]][key.split(".")[1]]
    with pytest.raises(ConfigError) as e:
        check_resume_config(recorded, _cfg(**{key: value}), DEFAULTS)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot resume: {key} was {old!r} in this workdir's run, "
                                               f"now {value!r} ")
    assert msg.endswith("--workdir=NEW, or resume with the recorded value")


def test_method_change_is_refused():
    recorded = _cfg()
    recorded["method"] = "lora"
    current = _cfg()
    current["method"] = "full"
    with pytest.raises(ConfigError, match=r"^cannot resume: method was 'lora' in this workdir's run, now 'full'"):
        check_resume_config(recorded, current, DEFAULTS)


def test_keys_that_may_change_do_not_stop_a_resume():
    recorded = _cfg()
    current = _cfg(**{"train.steps": 500, "train.log_every": 1, "eval.every": 5, "eval.max_examples": 10,
                      "checkpoint.every": 3, "checkpoint.keep": 9, "mesh.data": 2, "mesh.fsdp": 4,
                      "mesh.expert": 2, "data.prefetch": 0})
    check_resume_config(recorded, current, DEFAULTS)


def test_a_key_added_later_is_compared_too():
    recorded = _cfg()
    current = _cfg()
    current["train"]["new_knob"] = 2  # a key the recorded run never had: compared, not waved through
    with pytest.raises(ConfigError, match=r"train\.new_knob was not set in this workdir's run, now 2"):
        check_resume_config(recorded, current, DEFAULTS)
    older = _cfg()
    del older["train"]["early_stop_patience"]  # a run recorded before the key existed ran with its default
    check_resume_config(older, _cfg(), DEFAULTS)
    with pytest.raises(ConfigError, match=r"train\.early_stop_patience was 0 in this workdir's run, now 3"):
        check_resume_config(older, _cfg(**{"train.early_stop_patience": 3}), DEFAULTS)


def test_changed_data_is_described_in_words_not_dicts():
    fp = {"size": 953103, "sha256": "56e6" + "0" * 60}
    with pytest.raises(ConfigError) as e:
        check_same({"train.jsonl": fp}, {}, "training data")
    msg = str(e.value)
    assert msg == ("cannot resume: the training data changed since the checkpoint: train.jsonl is no longer there "
                   "(was 953,103 bytes (sha256 56e600000000…)); start a new run with --workdir=NEW")
    with pytest.raises(ConfigError, match=r"train\.jsonl was 953,103 bytes \(sha256 56e600000000…\), now 10 bytes"):
        check_same({"train.jsonl": fp}, {"train.jsonl": {"size": 10, "sha256": "ab" * 32}}, "training data")
    with pytest.raises(ConfigError, match=r"the base model changed since the checkpoint: files\.model\.gguf is new"):
        check_same({"path": "m", "files": {}}, {"path": "m", "files": {"model.gguf": {"size": 1,
                                                                                     "header_sha256": "00"}}},
                   "base model")
