"""KV-cache decoding and generation: cache logits vs the full forward, greedy/EOS vs transformers, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ftjax.generate import _generate, _sample, bucket_length, filter_logits, generate, generate_tokens, left_pad, \
    stop_ids, trim
from ftjax.interop.hf import load_hf
from ftjax.models.llama import KVCache
from hf_helpers import FAMILIES, MODEL_TOL, jax_logits, max_diff, random_ids, save, tiny_hf, tiny_tokenizer

N_NEW = 12
PROMPT_LENGTHS = (3, 9, 5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny transformers llama and the same weights loaded by ftjax."""
    hf = tiny_hf("llama", seed=5)
    return hf, load_hf(save(hf, tmp_path_factory.mktemp("gen")))


@pytest.fixture(scope="module")
def prompts():
    return [list(map(int, random_ids(1, n, seed=10 + n)[0])) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy(pair, prompts):
    return generate_tokens(pair[1], prompts, max_new_tokens=N_NEW, pad_id=0)


def hf_generate(hf, prompts, max_new_tokens=N_NEW, eos_ids=None, pad_id=0) -> np.ndarray:
    """transformers' greedy generate on the left-padded batch, padded with pad_id to max_new_tokens columns."""
    p = max(map(len, prompts))
    ids = np.full((len(prompts), p), pad_id, np.int64)
    mask = np.zeros((len(prompts), p), np.int64)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):], mask[i, p - len(row):] = row, 1
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids)
    new = out[:, p:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad_id)


def right_padded(rows):
    """A right-padded batch (segment id 0 on pads): the full-forward reference path proven in parity tests."""
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    seg = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], seg[i, :len(r)] = r, 1
    return ids, np.tile(np.arange(t), (len(rows), 1)), seg


# ----------------------------------------------------------------------------- KV cache


def _decode_fn(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, pos, seg, cache):
        return nnx.merge(graphdef, state).decode(ids, pos, seg, cache)

    return lambda *a: step(state, *(jnp.asarray(x) if isinstance(x, np.ndarray) else x for x in a))


@pytest.mark.parametrize("family", ["llama_mqa_tied", "qwen2_layer_windows", "gemma2", "gemma3",
                                    "phi4_mini_partial_rotary", "phi3_window"])
def test_kv_cache_matches_full_forward(family, tmp_path):
    """Left-padded prefill then one-token steps: every real position's logits equal the full forward.

    Rows of 3, 8 and 6 prompt tokens in 8 slots (the 8-token row has no padding) plus 5 steps,
    past the sliding window of 4.
    """
    model_type, overrides = FAMILIES[family]
    check_kv_cache_matches_full_forward(load_hf(save(tiny_hf(model_type, **overrides), tmp_path)))


def check_kv_cache_matches_full_forward(model):
    """Prefill of 3 left-padded prompts (3, 8, 6 tokens in 8 slots) then 5 one-token steps vs the full forward."""
    decode = _decode_fn(model)
    prompts = [list(random_ids(1, n, seed=n)[0]) for n in (3, 8, 6)]
    cont = random_ids(3, 5, seed=9)
    batch = left_pad(prompts, pad_id=0, length=8)
    cache = KVCache.empty(model.config, 3, 8 + 5)
    logits, cache = decode(batch.input_ids, batch.positions, batch.segment_ids, cache)
    prefill = np.asarray(logits)
    steps = []
    for j in range(5):
        pos = (batch.lengths + j)[:, None].astype(np.int32)
        logits, cache = decode(cont[:, j:j + 1].astype(np.int32), pos, np.ones((3, 1), np.int32), cache)
        steps.append(np.asarray(logits)[:, 0])
    assert int(cache.index) == 13
    rows = [p + list(c) for p, c in zip(prompts, cont)]
    ref = jax_logits(model, *right_padded(rows))
    for i, p in enumerate(prompts):
        n = len(p)
        assert max_diff(prefill[i, 8 - n:], ref[i, :n]) <= MODEL_TOL
        assert max_diff(np.stack([s[i] for s in steps]), ref[i, n:n + 5]) <= MODEL_TOL


def test_generation_logits_match_full_forward(pair, prompts, greedy):
    """The logits each greedy token was chosen from equal the full forward over prompt + tokens so far."""
    tokens, logits = generate_tokens(pair[1], prompts, max_new_tokens=N_NEW, pad_id=0, return_logits=True)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    rows = [p + list(t) for p, t in zip(prompts, tokens)]
    ref = jax_logits(pair[1], *right_padded(rows))
    for i, p in enumerate(prompts):
        n = len(p)
        assert max_diff(logits[i], ref[i, n - 1:n - 1 + N_NEW]) <= MODEL_TOL


# ----------------------------------------------------------------------------- greedy and EOS vs transformers


def test_greedy_matches_transformers(pair, prompts, greedy):
    assert greedy.shape == (3, N_NEW)
    np.testing.assert_array_equal(greedy, hf_generate(pair[0], prompts))
    assert len({tuple(r) for r in greedy}) == 3  # rows differ: the prompts matter


def test_eos_stopping_matches_transformers(pair, prompts, greedy):
    """Two EOS ids taken from the greedy rows: rows stop there (EOS kept) and emit pad afterwards."""
    eos = [int(greedy[0, 3]), int(greedy[1, 6])]
    out = generate_tokens(pair[1], prompts, max_new_tokens=N_NEW, eos_ids=eos, pad_id=0)
    np.testing.assert_array_equal(out, hf_generate(pair[0], prompts, eos_ids=eos))
    for i, row in enumerate(out):
        hits = [j for j, t in enumerate(greedy[i]) if t in eos]
        stop = hits[0] if hits else N_NEW - 1
        np.testing.assert_array_equal(row[:stop + 1], greedy[i, :stop + 1])
        assert np.all(row[stop + 1:] == 0)
        if hits:
            assert trim(row, eos) == [int(t) for t in greedy[i, :stop]]
    assert np.all(out[0, 4:] == 0)
    # every row finished early: the loop stops, the rest is padding
    out = generate_tokens(pair[1], prompts, max_new_tokens=N_NEW, eos_ids=list(greedy[:, 0]), pad_id=0)
    np.testing.assert_array_equal(out[:, 0], greedy[:, 0])
    assert np.all(out[:, 1:] == 0)


# ----------------------------------------------------------------------------- sampling


def test_top_p_near_zero_is_greedy(pair, prompts, greedy):
    out = generate_tokens(pair[1], prompts, max_new_tokens=N_NEW, pad_id=0, temperature=1.0, top_p=1e-6, seed=3)
    np.testing.assert_array_equal(out, greedy)


def test_sampling_reproducible_by_seed(pair, prompts, greedy):
    kw = dict(max_new_tokens=N_NEW, pad_id=0, temperature=2.0, top_p=0.95)
    a = generate_tokens(pair[1], prompts, seed=1, **kw)
    np.testing.assert_array_equal(a, generate_tokens(pair[1], prompts, seed=1, **kw))
    assert not np.array_equal(a, generate_tokens(pair[1], prompts, seed=2, **kw))
    assert not np.array_equal(a, greedy)


@pytest.mark.parametrize("top_k,top_p", [(10, 1.0), (0, 0.7), (0, 0.05), (20, 0.9)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = (2.0 * np.random.default_rng(0).standard_normal((4, 128))).astype(np.float32)
    ref = torch.as_tensor(logits)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p, use_top_p=top_p < 1.0))
    kept = ours > np.finfo(np.float32).min
    np.testing.assert_array_equal(kept, np.isfinite(ref.numpy()))
    np.testing.assert_array_equal(ours[kept], logits[kept])


def test_sampling_frequencies_follow_the_filtered_softmax():
    """20k draws at temperature 0.7 and top-p 0.8 against the closed-form renormalized distribution."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0]])
    temperature, top_p = 0.7, 0.8
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: _sample(logits, k, temperature, top_p, greedy=False, top_k=0, use_top_p=True))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=5) / draws.size
    p = np.exp(np.asarray(logits[0]) / temperature)
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p  # sorted already
    expected = np.where(keep, p, 0.0) / p[keep].sum()
    assert keep.tolist() == [True, True, False, False, False]
    assert np.all(np.abs(freq - expected) <= 4 * np.sqrt(expected * (1 - expected) / draws.size) + 1e-12)


# ----------------------------------------------------------------------------- compiles and chat API


def test_one_compile_per_bucket(pair, prompts, greedy):
    """Other prompt lengths in the same bucket, other EOS lists: the compiled loop is reused."""
    assert [bucket_length(n) for n in (1, 16, 17, 100, 512, 513)] == [16, 16, 32, 128, 512, 1024]
    before = _generate._cache_size()
    out = generate_tokens(pair[1], [[5, 6, 7, 8, 9, 10, 11], [12], [1] * 16], max_new_tokens=N_NEW, eos_ids=[3, 4])
    generate_tokens(pair[1], [p[:2] for p in prompts], max_new_tokens=N_NEW)
    generate_tokens(pair[1], [[5]] + prompts[1:], max_new_tokens=N_NEW, eos_ids=[9])
    assert _generate._cache_size() == before
    assert out.shape == greedy.shape


def test_chat_generate_matches_transformers(pair):
    """Chat template applied, replies decoded up to EOS: the same text as transformers' generate gives."""
    hf, model = pair
    tok = tiny_tokenizer()
    eos = [tok.eos_token_id, 2]
    assert stop_ids(model, tok) == eos
    conversations = ["w1 w2 w3", [{"role": "system", "content": "w40"}, {"role": "user", "content": "w30 w31"}],
                     [{"role": "user", "content": "w7"}]]
    replies = generate(model, tok, conversations, max_new_tokens=N_NEW)
    assert generate(model, tok, conversations[1], max_new_tokens=N_NEW) == replies[1]

    as_messages = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in conversations]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]
               for c in as_messages]
    ref = hf_generate(hf, prompts, max_new_tokens=N_NEW, eos_ids=eos, pad_id=tok.pad_token_id)
    expected = [tok.decode(trim(r, eos), skip_special_tokens=True) for r in ref]
    assert replies == expected
    assert sum(bool(r.strip()) for r in replies) >= 2


def test_greedy_on_eight_device_mesh_matches_one_device(pair, prompts, greedy, tmp_path):
    """The same weights loaded sharded (fsdp 4 x tensor 2) generate the same tokens."""
    from ftjax.sharding import make_mesh

    folder = save(pair[0], tmp_path)
    sharded = load_hf(folder, mesh=make_mesh(1, 4, 2))
    assert len(sharded.embed_tokens[...].addressable_shards) == 8
    np.testing.assert_array_equal(generate_tokens(sharded, prompts, max_new_tokens=N_NEW, pad_id=0), greedy)
