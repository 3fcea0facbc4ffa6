"""Forgetting control wired into training: L2 and KL to the base in the step, replay in the data, and the
issue's acceptance (the KL term lowers the measured kl_to_base of a real run; resume stays exact)."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ftjax.api import load_tokenizer
from ftjax.data import build_datasets, train_iterator
from ftjax.data.records import Fields, read_file
from ftjax.data.retain import load_retain
from ftjax.data.tokenize import tokenize_records
from ftjax.errors import ConfigError
from ftjax.evaluation.base import base_view
from ftjax.evaluation.divergence import token_kl
from ftjax.lora import apply_lora
from ftjax.methods import method_for
from ftjax.objectives.terms import cross_entropy, kl_to_base, l2_to_base_term
from ftjax.sharding import make_mesh
from ftjax.train import forget
from ftjax.train.compose import compose, data_spec
from ftjax.train.loop import run
from ftjax.train.optimizer import make_optimizer
from ftjax.train.state import init_state
from ftjax.train.step import Frozen, make_train_step
from loop_helpers import load_config, metrics
from train_helpers import make_batch, tiny_model


def sgd(lr=0.5):
    """Plain SGD without clipping: the update is exactly -lr · gradient, so gradients can be read back."""
    return make_optimizer(ml_collections.ConfigDict(dict(
        name="sgd", lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=0.0, min_lr_ratio=0.0,
        b1=0.9, b2=0.999, eps=1e-8, momentum=0.0)), 10)


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_l2_term_and_its_gradient(mesh1):
    """l2_reg = Σ‖W − W0‖² (numpy) and the update differs from the CE-only one by exactly lr · 2w(W − W0)."""
    opt, w, lr = sgd(), 0.3, 0.5
    state = init_state(lambda: tiny_model(0), opt.tx, mesh1, trainable=nnx.Param)
    base = copy(state.trainable)
    rng = np.random.default_rng(0)
    moved = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), host(base))
    batch, key = make_batch(4, 16), jax.random.key(0)
    plain = make_train_step(state, opt, mesh1, loss_chunk=8, with_start_copy=False)
    l2 = make_train_step(state, opt, mesh1, terms=[cross_entropy(8), l2_to_base_term(w)], with_start_copy=True)
    t_plain, _, m_plain = plain(copy(moved), copy(state.opt_state), state.frozen, batch, key)
    t_l2, _, m_l2 = l2(copy(moved), copy(state.opt_state), Frozen(state.frozen, base), batch, key)
    diffs = jax.tree.map(lambda a, b: a - b, moved, host(base))
    want_l2 = sum(float(np.sum(np.square(d.astype(np.float64)))) for d in jax.tree.leaves(diffs))
    assert float(m_l2["l2_reg"]) == pytest.approx(want_l2, rel=1e-5)
    assert float(m_l2["loss"]) == float(m_plain["loss"])  # metrics' loss stays the task CE
    assert float(m_l2["loss_total"]) == pytest.approx(float(m_l2["loss"]) + w * want_l2, rel=1e-5)
    got = jax.tree.map(lambda a, b: (a - b) / lr, host(t_plain), host(t_l2))
    jax.tree.map(lambda g, d: np.testing.assert_allclose(g, 2 * w * d, atol=2e-5), got, diffs)


def lora_state(opt, mesh):
    return init_state(lambda: apply_lora(tiny_model(0), 4, 8.0, rngs=nnx.Rngs(1)), opt.tx, mesh,
                      trainable=nnx.LoRAParam)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_kl_term_is_zero_at_the_base_and_exact_after(mesh1):
    """LoRA: zero adapters are the base, so the KL term and its gradient vanish at step 0; with adapters
    moved, kl_reg equals a direct token-mean KL(base ‖ tuned) on the retain batch. No base copy is kept."""
    opt = sgd()
    state = lora_state(opt, mesh1)
    batch, retain, key = make_batch(4, 16, seed=0), make_batch(4, 16, seed=1), jax.random.key(0)
    plain = make_train_step(state, opt, mesh1, loss_chunk=8)
    kl = make_train_step(state, opt, mesh1, terms=[cross_entropy(8), kl_to_base(2.0, 8)])
    assert not kl.with_start_copy
    t_plain, _, _ = plain(copy(state.trainable), copy(state.opt_state), state.frozen, batch, key)
    t_kl, _, m = kl(copy(state.trainable), copy(state.opt_state), state.frozen, {**batch, "retain": retain}, key)
    assert abs(float(m["kl_reg"])) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), host(t_plain), host(t_kl))

    rng = np.random.default_rng(2)
    moved = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), host(t_kl))
    _, _, m = kl(copy(moved), copy(state.opt_state), state.frozen, {**batch, "retain": retain}, key)
    model = nnx.merge(state.graphdef, moved, state.frozen)
    args = (retain["input_ids"], retain["positions"], retain["segment_ids"])
    per_token = np.asarray(token_kl(base_view(model)(*args), model(*args)), np.float64)
    wts = retain["loss_weights"].astype(np.float64)
    assert float(m["kl_reg"]) == pytest.approx(np.sum(per_token * wts) / np.sum(wts), rel=1e-4)

    c = load_config()
    c.forget.kl_weight = 1.0
    assert not forget.keeps_start_copy(method_for(c.method, c.lora), c.forget, evaluating=True)  # LoRA: no copy
    c.method = "full"
    assert forget.keeps_start_copy(method_for(c.method, c.lora), c.forget, evaluating=False)
    full = init_state(lambda: tiny_model(0), opt.tx, mesh1, trainable=nnx.Param)
    no_base = make_train_step(full, opt, mesh1, terms=[cross_entropy(8), kl_to_base(1.0, 8)])
    with pytest.raises(ConfigError, match="LoRA"):  # zeroed full weights are not the base
        no_base(full.trainable, full.opt_state, full.frozen, {**batch, "retain": retain}, key)


def test_memory_estimate_counts_the_base_copy_and_the_retain_batch():
    from ftjax.interop.sources import tiny_config
    from ftjax.train.memory import estimate

    c = load_config()
    c.method = "full"
    mesh = make_mesh(8, 1, 1)
    plain = estimate(compose(c), tiny_config(), mesh)
    c.forget.kl_weight = 1.0
    kl = estimate(compose(c), tiny_config(), mesh)
    assert "start_copy" not in plain and kl["start_copy"] == kl["trainable"]
    assert kl["activations"] == 2 * plain["activations"]


def test_bad_forget_values_are_config_errors():
    from ftjax.config import validate

    for key, value, match in [("kl_weight", -1.0, "kl_weight"), ("l2_weight", -0.1, "l2_weight"),
                              ("replay_fraction", 1.0, "replay_fraction"), ("replay_samples", 0, "replay_samples"),
                              ("replay_temperature", -1.0, "replay_temperature")]:
        c = load_config()
        c.method = "full"
        c.forget[key] = value
        with pytest.raises(ConfigError, match=match):
            validate(c)
    c = load_config()
    c.forget.replay_temperature = 0.0  # greedy: every "sample" the same reply
    with pytest.raises(ConfigError, match="replay_samples > 1"):
        validate(c)
    c = load_config()
    c.forget.l2_weight = 0.1  # LoRA: Σ‖adapters‖² would be weight decay toward a random A, not the base
    with pytest.raises(ConfigError, match="method=full"):
        validate(c)


def retain_file(path, n=16, start=0):
    """A retain set with the user's own replies (the tiny random model's greedy replies are only newlines)."""
    with open(path, "w") as f:
        for i, item in enumerate(load_retain()[start:start + n], start):
            reply = f"Sure. Here is a plain answer, number {i}, in a few short words."
            f.write(json.dumps({"prompt": item.prompt[0][1], "completion": reply}) + "\n")
    return str(path)


def test_replay_makes_up_its_fraction_of_the_batches(tmp_path):
    """Every task example is kept and replay examples make up replay_fraction of one pass, in the batches."""
    c = load_config()
    tok = load_tokenizer(c.model.path)
    path = tmp_path / "replay.jsonl"
    with open(path, "w") as f:
        for i, item in enumerate(load_retain()[:10]):
            f.write(json.dumps({"messages": [{"role": "user", "content": item.prompt[0][1]},
                                             {"role": "assistant", "content": f"Reply {i} kept."}]}) + "\n")
    data = build_datasets(data_spec(c), tok, replay=(str(path), 0.3))
    replay_ids = {tuple(np.asarray(ids).tolist()) for ids, _ in (tokenize_records(
        read_file(str(path), Fields()).records, tok, "assistant").tokens(i) for i in range(10))}

    def count(batch, counts):
        for row in range(batch["input_ids"].shape[0]):
            for seg in set(batch["segment_ids"][row].tolist()) - {0}:
                on = batch["segment_ids"][row] == seg
                ids = tuple(batch["input_ids"][row][on].tolist() + [int(batch["targets"][row][on][-1])])
                counts["replay" if ids in replay_ids else "task"] += 1
        return counts

    whole = count(data.train.batch(np.arange(len(data.train))), {"replay": 0, "task": 0})  # one pass, every row
    assert whole["task"] == 64  # the whole task set, nothing subsampled
    assert whole["replay"] == round(0.3 / 0.7 * 64)
    seen = {"replay": 0, "task": 0}
    it = train_iterator(data.train, c.train.batch_size, seed=0, prefetch=0)
    for _ in range(30):  # the shuffled batches the step gets: the same fraction, within sampling error
        count(next(it), seen)
    it.close()
    share = seen["replay"] / sum(seen.values())
    assert share == pytest.approx(0.3, abs=4 * np.sqrt(0.3 * 0.7 / sum(seen.values()))), seen
    assert data.summary.fingerprints["replay"]["fraction"] == 0.3
    other = build_datasets(data_spec(c), tok, replay=(str(path), 0.2)).summary.fingerprints
    assert other["replay"] != data.summary.fingerprints["replay"]  # a resume with another fraction is refused


def forget_config(tmp_path, *, kl: float, final_eval: bool):
    """The tiny run at a high learning rate (it drifts from the base), replay on, eval cut to the minimum."""
    c = load_config()
    c.optim.lr = 5e-2
    c.train.steps = 6
    c.checkpoint.every = 3
    c.forget.retain = retain_file(tmp_path / "retain.jsonl")  # measured on these
    c.forget.control = retain_file(tmp_path / "control.jsonl", start=16)  # trained on other prompts
    c.forget.replay_fraction = 0.25
    c.forget.kl_weight = kl
    c.eval.final = final_eval
    c.eval.few_shot = 0
    c.eval.max_examples = 2
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forget")
    out = {}
    for name, kl in (("plain", 0.0), ("kl", 50.0)):
        out[name] = tmp / name
        run(forget_config(tmp, kl=kl, final_eval=True), out[name])
    return out


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_kl_regularizer_lowers_the_measured_forgetting(runs):
    """The issue's acceptance: same seed, same data (replay on in both); only forget.kl_weight differs."""
    kl = {k: json.loads((w / "report.json").read_text())["forgetting"]["kl_to_base"] for k, w in runs.items()}
    assert kl["kl"] < 0.7 * kl["plain"], kl
    logged = metrics(runs["kl"])
    assert all({"loss", "kl_reg", "loss_total"} <= set(r) for r in logged if "loss" in r)
    assert abs(logged[0]["kl_reg"]) < 1e-6  # step 1 starts at the base
    assert all("kl_reg" not in r for r in metrics(runs["plain"]))


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_resume_is_exact_with_replay_and_kl(runs, tmp_path):
    """Replay batches and the retain iterator resume exactly: 3 steps + resume + 3 = 6 straight, bitwise."""
    c = forget_config(tmp_path, kl=50.0, final_eval=False)
    run(c, tmp_path / "split", until=3)
    run(c, tmp_path / "split")
    straight = [r for r in metrics(runs["kl"]) if "loss" in r]
    split = [r for r in metrics(tmp_path / "split") if "loss" in r]
    for key in ("loss", "kl_reg", "grad_norm"):
        assert [r[key] for r in split] == [r[key] for r in straight], key


def test_replay_file_holds_base_samples_and_own_replies(tmp_path):
    """Replay trains on `replay_samples` base samples per prompt without a reply of the user's, and on the
    user's own replies as many times; no greedy replies are made when the KL term is off."""
    from ftjax.data.retain import as_messages

    c = load_config()
    c.forget.replay_fraction, c.forget.replay_samples, c.forget.max_new_tokens = 0.25, 3, 8
    control = tmp_path / "control.jsonl"
    own = load_retain(retain_file(tmp_path / "own.jsonl", n=2))
    asked = load_retain()[20:24]
    with open(control, "w") as f:
        f.write((tmp_path / "own.jsonl").read_text())
        f.writelines(json.dumps({"prompt": it.prompt[0][1]}) + "\n" for it in asked)
    c.forget.control = str(control)
    workdir = tmp_path / "run"
    from ftjax.api import load_model

    tuned = apply_lora(load_model(c.model.path), 4, 8.0, rngs=nnx.Rngs(1))  # the run's model at step 0
    state = types.SimpleNamespace(model=lambda: tuned)
    data = forget.retain_data(compose(c), load_tokenizer(c.model.path), workdir, state, None)
    assert data.replies is None and not (workdir / forget.CONTROL_CACHE).exists()
    samples = json.loads((workdir / forget.CONTROL_SAMPLES).read_text())
    assert samples["identity"]["temperature"] == 1.0 and samples["identity"]["samples"] == 3
    sampled = [(as_messages(it.prompt), row["reply"], row["unfinished"])
               for it, row in zip([it for it in asked for _ in range(3)], samples["replies"])]
    mine = [(as_messages(it.prompt), it.reply, False) for it in own for _ in range(3)]
    want = [{"messages": m + [{"role": "assistant", "content": r}], **({"unfinished": True} if cut else {})}
            for m, r, cut in sampled + mine if r.strip()]
    got = [json.loads(line) for line in open(data.replay_path)]
    assert got == want and len(got) > len(mine)
    assert any(r.get("unfinished") for r in got)  # 8 tokens of a random model: cut before any EOS
