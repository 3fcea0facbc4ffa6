"""Forgetting figures: KL(base ‖ tuned) and NLL against numpy on the logits, KL of a model with itself,
the LoRA base view, cached base replies, QA accuracy."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.evaluation.base import adapters_off, base_view
from ftjax.evaluation.forgetting import CACHE_NAME, base_replies, forgetting_metrics
from ftjax.data.retain import RetainItem, load_retain
from ftjax.evaluation.scorers import contains_answer
from ftjax.evaluation.token_stats import TokenSums, teacher_forced
from ftjax.lora import apply_lora
from ftjax.models.llama import Llama
from hf_helpers import MODEL_TOL, tiny_tokenizer
from train_helpers import TINY

CFG = TINY.replace(vocab_size=128)  # the tiny word-level tokenizer's vocabulary
SELF_TOL = 1e-6


def model(seed: int = 0) -> Llama:
    return Llama(CFG, rngs=nnx.Rngs(seed))


def lora_model(seed: int = 0, b_scale: float = 0.0) -> Llama:
    """A LoRA model; with b_scale > 0 its adapters are far from zero (a 'tuned' model)."""
    m = apply_lora(model(seed), 4, 8.0, rngs=nnx.Rngs(seed + 1))
    if b_scale:
        for path, var in nnx.iter_graph(m):
            if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
                rng = np.random.default_rng(len(path))
                var[...] = b_scale * rng.standard_normal(var[...].shape).astype(np.float32)
    return m


def random_sequences(n=7, seed=0):
    """Sequences of varied lengths with random measured positions (the first token never is)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.choice([4, 19, 41]))  # few distinct lengths: the reference compiles once per length
        ids = rng.integers(1, CFG.vocab_size, length).astype(np.int32)
        trained = rng.random(length) < 0.6
        trained[0], trained[-1] = False, True
        out.append((ids, trained))
    return out


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def forward(m):
    graphdef, state = nnx.split(m)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(fn(state, ids))


def numpy_sums(tuned, base, seqs):
    """Direct per-sequence sums from each model's full-sequence logits (one unpadded forward each)."""
    nll, base_nll, kl, tokens = [], [], [], []
    tuned, base = forward(tuned), forward(base)
    for ids, trained in seqs:
        lt = log_softmax64(tuned(ids[None])[0])[:-1]
        lb = log_softmax64(base(ids[None])[0])[:-1]
        w = trained[1:].astype(np.float64)
        tgt = ids[1:]
        nll.append(np.sum(-lt[np.arange(len(tgt)), tgt] * w))
        base_nll.append(np.sum(-lb[np.arange(len(tgt)), tgt] * w))
        kl.append(np.sum((np.exp(lb) * (lb - lt)).sum(-1) * w))
        tokens.append(w.sum())
    return np.array(nll), np.array(base_nll), np.array(kl), np.array(tokens)


def test_kl_and_nll_match_numpy():
    """Batched, padded, chunked sums equal the direct computation per sequence (whole-model tolerance)."""
    tuned, base = model(0), model(1)
    seqs = random_sequences()
    got = teacher_forced(tuned, seqs, base=base, batch_size=3, chunk=16)
    nll, base_nll, kl, tokens = numpy_sums(tuned, base, seqs)
    np.testing.assert_array_equal(got.tokens, tokens)
    per_token = lambda s: s / tokens
    np.testing.assert_allclose(per_token(got.nll), per_token(nll), atol=MODEL_TOL, rtol=0)
    np.testing.assert_allclose(per_token(got.base_nll), per_token(base_nll), atol=MODEL_TOL, rtol=0)
    np.testing.assert_allclose(per_token(got.kl), per_token(kl), atol=MODEL_TOL, rtol=0)
    assert np.all(kl > 0.01)  # two different models: a real divergence is being checked
    assert TokenSums.mean(got.kl, got.tokens) == pytest.approx(kl.sum() / tokens.sum(), abs=MODEL_TOL)


def test_kl_of_model_with_itself_is_zero():
    m = model(0)
    got = teacher_forced(m, random_sequences(), base=m, batch_size=4, chunk=16)
    assert np.max(np.abs(got.kl / got.tokens)) <= SELF_TOL
    np.testing.assert_allclose(got.nll, got.base_nll, atol=SELF_TOL * got.tokens.max())


def test_lora_base_view_is_the_base_model():
    """Adapters off gives the base's logits exactly; the tuned model keeps its adapters; fresh LoRA has KL 0."""
    ids = random_sequences(1)[0][0][None]
    plain = model(0)
    tuned = lora_model(0, b_scale=0.5)
    want = forward(plain)(ids)
    np.testing.assert_array_equal(forward(base_view(tuned))(ids), want)
    assert np.max(np.abs(forward(tuned)(ids) - want)) > 1e-3  # the tuned model keeps its adapters
    with adapters_off(tuned):
        np.testing.assert_array_equal(forward(tuned)(ids), want)
    fresh = lora_model(0)
    got = teacher_forced(fresh, random_sequences(), base=base_view(fresh), chunk=16)
    assert np.max(np.abs(got.kl / got.tokens)) <= SELF_TOL


ITEMS = [RetainItem((("user", "w1 w2 w3"),)), RetainItem((("user", "w4 w5"),), answer="w9|w10"),
         RetainItem((("system", "w7"), ("user", "w8 w9 w11 w12"),)), RetainItem((("user", "w13"),), answer="w2")]


def test_base_replies_cached_and_forgetting_metrics(tmp_path):
    """Base replies are generated once and read back; the metrics are the numpy figures on prompt + reply."""
    tok = tiny_tokenizer()
    base = model(0)
    cache = tmp_path / CACHE_NAME
    first = base_replies(base, tok, ITEMS, max_new_tokens=6, cache=cache, model_id="m")
    assert cache.is_file()
    saved = json.loads(cache.read_text())
    saved["replies"][0]["reply"] = "from the cache"
    cache.write_text(json.dumps(saved))
    again = base_replies(model(5), tok, ITEMS, max_new_tokens=6, cache=cache, model_id="m")
    assert again.replies[0] == "from the cache" and again.reply_ids == first.reply_ids
    regenerated = base_replies(base, tok, ITEMS, max_new_tokens=6, cache=cache, model_id="other")
    assert regenerated.replies[0] == first.replies[0] != "from the cache"  # another model id: generated anew

    eos = tok.eos_token_id
    for r in first.reply_ids:  # replies stop at (and include) the first EOS, else run the full budget
        assert (eos in r and r.index(eos) == len(r) - 1) or len(r) == 6

    tuned = model(3)
    result = forgetting_metrics(tuned, base, tok, first)
    nll, base_nll, kl, tokens = numpy_sums(tuned, base, first.sequences())
    m = result.metrics
    assert m["kl_to_base"] == pytest.approx(kl.sum() / tokens.sum(), abs=MODEL_TOL)
    assert m["retain_nll_finetuned"] == pytest.approx(nll.sum() / tokens.sum(), abs=MODEL_TOL)
    assert m["retain_nll_base"] == pytest.approx(base_nll.sum() / tokens.sum(), abs=MODEL_TOL)
    asked = [i for i, it in enumerate(ITEMS) if it.answer]
    want_base = np.mean([contains_answer(first.replies[i], ITEMS[i].answer) for i in asked])
    want_tuned = np.mean([contains_answer(r, ITEMS[i].answer) for r, i in zip(result.qa_replies, asked)])
    assert m["qa_accuracy_base"] == want_base and m["qa_accuracy_finetuned"] == want_tuned
    assert len(result.qa_replies) == len(asked)

    same = forgetting_metrics(base, base, tok, first, qa=False)
    assert abs(same.metrics["kl_to_base"]) <= SELF_TOL
    assert same.metrics["retain_nll_finetuned"] == pytest.approx(same.metrics["retain_nll_base"], abs=SELF_TOL)


def test_bundled_retain_set():
    items = load_retain()
    qa = [it for it in items if it.answer]
    assert len(items) - len(qa) >= 40 and len(qa) >= 20
    assert len({it.prompt for it in items}) == len(items)
    assert all(it.prompt[-1][0] == "user" and it.prompt[-1][1].strip() for it in items)


def test_sampled_base_replies(tmp_path):
    """Replay's samples: `samples` replies per prompt (items repeated in order), fixed by the seed and cached
    under their own identity; a near-zero temperature gives the greedy replies (the sampler's limit)."""
    tok = tiny_tokenizer()
    base = model(0)
    greedy = base_replies(base, tok, ITEMS, max_new_tokens=6)
    kw = dict(max_new_tokens=6, temperature=1.0, samples=3)
    first = base_replies(base, tok, ITEMS, seed=1, cache=tmp_path / "s.json", model_id="m", **kw)
    assert first.items == [it for it in ITEMS for _ in range(3)]
    assert first.prompt_ids == [p for p in greedy.prompt_ids for _ in range(3)]
    assert base_replies(base, tok, ITEMS, seed=1, **kw).reply_ids == first.reply_ids  # the seed fixes them
    assert base_replies(base, tok, ITEMS, seed=2, **kw).reply_ids != first.reply_ids
    assert first.reply_ids != [r for r in greedy.reply_ids for _ in range(3)]
    for i in range(len(ITEMS)):  # three draws of a near-uniform random model: not all the same
        assert len({tuple(r) for r in first.reply_ids[3 * i:3 * i + 3]}) > 1
    cached = base_replies(model(5), tok, ITEMS, seed=1, cache=tmp_path / "s.json", model_id="m", **kw)
    assert cached.reply_ids == first.reply_ids
    cold = base_replies(base, tok, ITEMS, max_new_tokens=6, temperature=1e-4, samples=2)
    assert cold.reply_ids == [r for r in greedy.reply_ids for _ in range(2)]
    with pytest.raises(ValueError, match="greedy"):
        base_replies(base, tok, ITEMS, max_new_tokens=6, samples=2)
