"""Preference objectives through the training job on the tiny model: DPO's first step, the reference model without a
second copy (LoRA) or from the workdir's cache (full fine-tuning), exact resume after a kill, config errors."""

import json
import math
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax.api import load_model
from ftjax.checkpoint import Checkpoints
from ftjax.data.packing import BATCH_KEYS
from ftjax.data.preference_build import build_preference_datasets
from ftjax.errors import ConfigError
from ftjax.evaluation.shared_cache import base_content_id
from ftjax.interop.sources import load_pretrained, pretrained_tokenizer
from ftjax.objectives import reference_cache
from ftjax.objectives.preference_term import max_pairs_of
from ftjax.objectives.reply_logps import model_pair_logps
from ftjax.objectives.terms import cross_entropy
from ftjax.provenance import base_identity
from ftjax.sharding import make_mesh, mesh_from_config
from ftjax.train.compose import compose, data_spec, loss_terms
from ftjax.train.loop import run
from ftjax.train.setup import build_state
from ftjax.train.step import make_train_step
from loop_helpers import ROOT, load_config, metrics, script_env
from preference_helpers import write_pairs

STEPS = 4
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _config(pair_files, objective: str = "dpo", method: str = "lora"):
    c = load_config()
    c.data.train, c.data.eval = pair_files
    c.objective, c.method = objective, method
    c.train.steps, c.checkpoint.every = STEPS, 2
    c.eval.metric, c.eval.final = "exact", method == "lora"  # full fine-tuning's runs check the steps only
    return c


def _flags(pair_files, objective: str = "dpo", method: str = "lora") -> list[str]:
    """The command-line form of `_config` (for scripts/train.py)."""
    return [f"--config.data.train={pair_files[0]}", f"--config.data.eval={pair_files[1]}",
            f"--config.objective={objective}", f"--config.method={method}", f"--config.train.steps={STEPS}",
            "--config.checkpoint.every=2", "--config.eval.metric=exact", f"--config.eval.final={method == 'lora'}"]


@pytest.fixture(scope="module")
def full_dpo(pair_files, tmp_path_factory):
    """A straight full fine-tuning DPO run: the reference's log-probs computed once and cached in the workdir."""
    workdir = tmp_path_factory.mktemp("full_dpo")
    return workdir, run(_config(pair_files, method="full"), workdir)


@pytest.mark.slow  # a training run (> 15 s)
def test_lora_dpo_first_step_is_ln2_and_logs_trl_metrics_and_the_held_out_objective(pair_files, tmp_path):
    c = _config(pair_files)
    c.forget.retain = str(tmp_path / "retain.jsonl")  # forgetting measured on two prompts: seconds
    (tmp_path / "retain.jsonl").write_text('{"prompt": "What is 7 times 8?", "answer": "56"}\n'
                                           '{"prompt": "Write a haiku about autumn leaves."}\n')
    c.forget.max_new_tokens = 4
    run(c, tmp_path)
    records = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[0]["loss"] == float(np.float32(math.log(2)))  # a fresh adapter is the reference: exactly ln 2
    assert records[0]["rewards/margins"] == 0.0 and records[0]["rewards/accuracies"] == 0.0
    for r in records:
        assert set(TRL_METRICS) <= set(r)
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
    assert records[-1]["loss"] < records[0]["loss"]  # it learns to prefer the chosen replies
    assert 0.0 < records[-1]["eval_loss"] < 5.0  # the DPO loss on held-out pairs, not a cross-entropy (~10 here)
    assert not (tmp_path / "reference_logps.npz").exists()  # LoRA needs no cached reference

    report = json.loads((tmp_path / "report.json").read_text())  # before / after on the held-out pairs
    c = _config(pair_files)
    config_lib.validate(c)
    data = build_preference_datasets(data_spec(c), pretrained_tokenizer(c.model.path))
    base = load_pretrained(c.model.path, c.model.dtype, c.model.param_dtype)
    batch = {k: jnp.asarray(v) for k, v in data.eval.batch(np.arange(len(data.eval))).items()}
    logps, valid = model_pair_logps(base, batch, data.eval.max_pairs)
    wins = (np.asarray(logps.chosen) > np.asarray(logps.rejected))[np.asarray(valid)]  # DPO: summed log-probs
    assert report["preference"]["base"] == pytest.approx(
        {"accuracy": wins.mean(), "pairs": len(wins),
         "margin": float(np.mean(np.asarray(logps.chosen - logps.rejected)[np.asarray(valid)]))}, rel=1e-4)
    assert 0.0 <= report["preference"]["finetuned"]["accuracy"] <= 1.0
    assert {"kl_to_base", "retain_nll_base", "retain_nll_finetuned"} <= set(report["forgetting"])
    md = (tmp_path / "report.md").read_text()
    assert f"preference accuracy ({len(wins)} held-out pairs)" in md and "objective `dpo`" in md


def _step_inputs(c, mesh=None):
    config_lib.validate(c)
    mesh = mesh or mesh_from_config(c.mesh)
    setup = build_state(compose(c), mesh)
    data = build_preference_datasets(data_spec(c), pretrained_tokenizer(c.model.path),
                                     vocab_size=setup.model_config.vocab_size)
    batch = {k: jnp.asarray(v) for k, v in data.train.batch(np.arange(c.train.batch_size)).items()}
    return mesh, setup, batch


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_lora_reference_is_the_model_with_adapters_removed_and_a_fresh_adapter_gives_ln2(pair_files):
    c = _config(pair_files)
    mesh, setup, batch = _step_inputs(c)
    rng = np.random.default_rng(0)

    def randomize(path, x):  # non-zero adapters: otherwise policy = reference trivially
        name = jax.tree_util.keystr(path)
        return jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype) if "lora_b" in name else x

    step = make_train_step(setup.state, setup.optimizer, mesh, terms=loss_terms(compose(c)), rules=setup.rules)
    fresh = jax.tree.map(jnp.copy, setup.state.trainable)  # the step donates its trainables
    _, _, m = step(fresh, jax.tree.map(jnp.copy, setup.state.opt_state), setup.state.frozen, batch, jax.random.key(0))
    assert float(m["loss"]) == float(np.float32(math.log(2)))  # a fresh adapter is its own reference: exactly ln 2
    trainable = jax.tree_util.tree_map_with_path(randomize, setup.state.trainable)
    _, _, m = step(trainable, setup.state.opt_state, setup.state.frozen, batch, jax.random.key(0))
    beta = c.pref.beta
    reference_chosen = float(m["logps/chosen"]) - float(m["rewards/chosen"]) / beta
    reference_rejected = float(m["logps/rejected"]) - float(m["rewards/rejected"]) / beta
    assert abs(float(m["rewards/chosen"])) > 1e-3  # the adapters move the policy away from the reference

    base = load_pretrained(c.model.path, c.model.dtype, c.model.param_dtype)  # no adapters at all
    logps, valid = model_pair_logps(base, batch, max_pairs_of(c.data.seq_len))
    valid = np.asarray(valid)
    np.testing.assert_allclose(reference_chosen, np.asarray(logps.chosen)[valid].mean(), rtol=1e-4)
    np.testing.assert_allclose(reference_rejected, np.asarray(logps.rejected)[valid].mean(), rtol=1e-4)


def _layer_bytes(frozen) -> int:
    """Bytes of one decoder layer's frozen weights (layers are stacked on a leading axis)."""
    stacked = [x for p, x in jax.tree_util.tree_leaves_with_path(frozen) if "'layers'" in jax.tree_util.keystr(p)]
    return sum(x.size * x.dtype.itemsize // x.shape[0] for x in stacked)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_compiled_dpo_step_holds_no_second_copy_of_the_weights(pair_files):
    c = _config(pair_files)
    c.train.batch_size = 1  # one device: the figures are the whole step's
    mesh, setup, batch = _step_inputs(c, make_mesh(devices=jax.devices()[:1]))
    s = setup.state
    args = (s.trainable, s.opt_state, s.frozen, batch, jax.random.key(0))
    sft = make_train_step(s, setup.optimizer, mesh, terms=[cross_entropy(c.train.loss_chunk)], rules=setup.rules)
    dpo = make_train_step(s, setup.optimizer, mesh, terms=loss_terms(compose(c)), rules=setup.rules)
    sft_mem = sft.lower(*args).compile().memory_analysis()
    dpo_mem = dpo.lower(*args).compile().memory_analysis()
    layer = _layer_bytes(s.frozen)
    assert layer > 0
    # the same weights, optimizer state and batch (a preference batch is an SFT batch's arrays): no copy of any
    # weight for the reference
    assert set(batch) == set(BATCH_KEYS)
    assert dpo_mem.argument_size_in_bytes == sft_mem.argument_size_in_bytes
    assert dpo_mem.temp_size_in_bytes - sft_mem.temp_size_in_bytes < layer, (dpo_mem.temp_size_in_bytes,
                                                                             sft_mem.temp_size_in_bytes, layer)


@pytest.mark.slow  # a training run (> 15 s)
def test_full_ft_reference_cache_is_reused_on_resume_and_refused_when_its_identity_changed(
        pair_files, tmp_path, monkeypatch, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(open(pair_files[0]).read())
    c = _config((str(train), pair_files[1]), method="full")
    c.train.steps = 3
    run(c, tmp_path / "run", until=2)
    cache = tmp_path / "run" / reference_cache.CACHE_NAME
    with np.load(cache) as saved:  # one pass of the starting model over every train and held-out pair
        assert saved["train"].shape == (16, 2) and saved["eval"].shape == (8, 2)
        assert np.all(saved["train"] < 0) and np.all(np.isfinite(saved["eval"]))

    def recompute(*args, **kwargs):
        raise AssertionError("the cached reference log-probs should have been reused")

    monkeypatch.setattr(reference_cache, "pair_reference_logps", recompute)
    capsys.readouterr()
    run(c, tmp_path / "run")
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "reference log-probs reused" in out
    records = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the cache is the starting model's

    with open(train, "a") as f:  # the pairs change: their reference log-probs no longer apply
        f.write(open(pair_files[1]).readline())
    with pytest.raises(ConfigError, match="reference log-probs were computed for another data"):
        run(c, tmp_path / "run")


@pytest.mark.slow  # two training processes
def test_sigkill_then_resume_under_dpo_ends_at_the_same_loss(pair_files, full_dpo, tmp_path):
    straight, result = full_dpo

    def train(fault: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
               f"--workdir={tmp_path}", *_flags(pair_files, method="full")]
        return subprocess.run(cmd, env=script_env(8, fault), capture_output=True, text=True,
                              timeout=600)

    proc = train("kill@3")
    assert proc.returncode == -signal.SIGKILL
    latest = Checkpoints(tmp_path).latest_step()
    assert latest in (None, 2)  # the async save of step 2 may have been cut off: then it is absent, not partial
    proc = train("")
    assert proc.returncode == 0, proc.stderr[-2000:]
    if latest:
        assert f"resumed from step {latest}" in proc.stdout and "reference log-probs reused" in proc.stdout
    final = [r for r in metrics(tmp_path) if "loss" in r][-1]
    assert final["step"] == STEPS and final["loss"] == result["loss"]


@pytest.mark.parametrize("key,value,message", [
    ("objective", "kto", "config.objective='kto' is not one of sft, dpo, ipo, orpo, simpo"),
    ("pref.beta", 0.0, "config.pref.beta must be > 0, got 0.0"),
    ("pref.label_smoothing", 0.5, r"config.pref.label_smoothing must be in \[0, 0.5\), got 0.5"),
    ("pref.gamma", -1.0, "config.pref.gamma must be >= 0, got -1.0"),
    ("pref.sft_weight", -1.0, "config.pref.sft_weight must be >= 0, got -1.0"),
])
def test_preference_config_ranges_are_one_line_errors(key, value, message):
    c = config_lib.default_config()
    group, _, leaf = key.rpartition(".")
    setattr(c[group] if group else c, leaf, value)
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


@pytest.mark.parametrize("objective,key,value,message", [
    ("orpo", "sft_weight", 0.5, "config.pref.sft_weight does not apply to objective=orpo"),
    ("ipo", "label_smoothing", 0.1, "config.pref.label_smoothing applies to objective=dpo .* or simpo, not ipo"),
    ("sft", "label_smoothing", 0.1, "not sft"),
])
def test_preference_keys_that_do_not_apply_are_refused(objective, key, value, message):
    c = config_lib.default_config()
    c.objective = objective
    setattr(c.pref, key, value)
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


@pytest.mark.slow  # a training run (> 15 s)
def test_dpo_continues_an_sft_workdirs_adapter_with_it_as_the_reference(pair_files, tmp_path):
    sft = load_config()  # SFT on the tiny task, then DPO from its workdir
    sft.train.steps, sft.eval.final, sft.checkpoint.every = 2, False, 2
    run(sft, tmp_path / "sft")
    c = _config(pair_files)
    c.model.path, c.train.steps, c.eval.final = str(tmp_path / "sft"), 1, False
    run(c, tmp_path / "dpo")
    first = metrics(tmp_path / "dpo")[0]
    # the reference is the continued (trained, non-zero) adapter itself: policy = reference at the first step
    assert first["loss"] == float(np.float32(math.log(2))) and first["rewards/chosen"] == 0.0

    ids = jnp.arange(1, 17)[None]  # the DPO workdir loads (over the SFT workdir it started from) and differs
    dpo_logits, sft_logits = load_model(tmp_path / "dpo")(ids), load_model(tmp_path / "sft")(ids)
    assert not np.allclose(np.asarray(dpo_logits), np.asarray(sft_logits), atol=1e-4)
    assert np.allclose(np.asarray(load_model(tmp_path / "dpo")(ids)), np.asarray(dpo_logits), atol=0)

    c.model.path = sft.model.path  # the same pairs from the base with a fresh adapter: other log-probs
    run(c, tmp_path / "fresh")
    assert metrics(tmp_path / "fresh")[0]["logps/chosen"] != pytest.approx(first["logps/chosen"], rel=1e-4)

    sft_identity = base_identity(str(tmp_path / "sft"))  # a workdir base is pinned by its checkpoint files too
    assert "config.json" in sft_identity["files"]
    assert any(name.startswith("checkpoints/2/") for name in sft_identity["files"])
    shared_key = base_content_id(str(tmp_path / "sft"), {})["files"]  # base replies cached per trained weights
    assert any(name.startswith("checkpoints/2/") for name in shared_key)

    c.model.path, c.lora.rank = str(tmp_path / "sft"), 8
    with pytest.raises(ConfigError, match=r"config.lora.rank=8 differs from the adapter it continues in .* \(4\)"):
        run(c, tmp_path / "refused")


def test_the_recipes_pairs_hold_the_same_object_in_two_key_orders(tmp_path, monkeypatch):
    from ftjax.tasks import person_json, person_json_pairs

    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path))
    train, held_out = person_json_pairs.files(n_train=20, n_eval=5)
    records = [json.loads(line) for line in open(train)] + [json.loads(line) for line in open(held_out)]
    assert len(records) == 25 and len({r["prompt"] for r in records}) == 25  # disjoint, distinct sentences
    for r in records:
        chosen, rejected = json.loads(r["chosen"]), json.loads(r["rejected"])
        assert chosen == rejected and list(chosen) == sorted(chosen) and tuple(rejected) == person_json.KEYS
