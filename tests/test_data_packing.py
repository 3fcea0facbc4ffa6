"""Packing: rows hold each example once, with its own segment id and positions, and a packed batch gives
the same per-example losses as the examples run one per row with no packing (ftjax's Llama, fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_helpers import chat, data_part, smollm2_tokenizer, write_jsonl
from ftjax.data import build_datasets
from ftjax.data.packing import best_fit_rows
from ftjax.models.llama import Llama, ModelConfig

ATOL = 1e-5  # fp32, per-example mean loss
VOCAB = 49152  # SmolLM2's
TINY = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=256)


def _build(tmp_path, n=24, seq_len=160, packing=True):
    recs = [chat(i, turns=1 + i % 3, system=i % 4 == 0) for i in range(n)]
    path = write_jsonl(tmp_path / "chats.jsonl", recs)
    return build_datasets(data_part(path, seq_len=seq_len, packing=packing), smollm2_tokenizer(),
                          vocab_size=VOCAB).train


def _random_model() -> Llama:
    """The tiny Llama with random numpy weights (skips compiling one init kernel per parameter shape)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(TINY, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), state)
    return nnx.merge(graphdef, state)


def _ce(logits, targets):
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_packed_losses_equal_unpacked_per_example(tmp_path):
    rows = _build(tmp_path)
    ex = rows.examples
    assert len(rows) < len(ex)  # really packed: several examples per row
    # real SmolLM2 ids, renumbered densely (the same bijection for packed and unpacked) to keep logits small
    used = np.unique(ex.ids)
    assert len(used) <= TINY.vocab_size
    dense = np.zeros(VOCAB, np.int32)
    dense[used] = np.arange(len(used), dtype=np.int32)
    model = _random_model()

    forward = jax.jit(lambda ids, pos, seg, tgt: _ce(model(ids, positions=pos, segment_ids=seg), tgt))
    n_ex, t = len(ex), rows.seq_len
    # packed: all rows, padded with empty rows to n_ex rows so both runs share one compiled shape
    b = rows.batch(np.concatenate([np.arange(len(rows)), -np.ones(n_ex - len(rows), np.int64)]))
    ce = np.asarray(forward(dense[b["input_ids"]], b["positions"], b["segment_ids"], dense[b["targets"]]))
    packed = {}
    for r in range(len(rows)):
        for s, e in enumerate(rows.row_items(r), 1):
            w = b["loss_weights"][r] * (b["segment_ids"][r] == s)
            packed[int(e)] = float((ce[r] * w).sum() / w.sum())

    # reference: every example alone in its own row, right-padded, plain positions, one segment per row
    ids = np.zeros((n_ex, t + 1), np.int32)
    weights = np.zeros((n_ex, t), np.float32)
    for e in range(n_ex):
        tok, trained = ex.tokens(e)
        ids[e, :len(tok)] = dense[tok]
        weights[e, :len(tok) - 1] = trained[1:]
    ref_ce = np.asarray(forward(ids[:, :-1], np.tile(np.arange(t, dtype=np.int32), (n_ex, 1)),
                                np.ones((n_ex, t), np.int32), ids[:, 1:]))
    assert sorted(packed) == list(range(len(ex)))
    for e in range(n_ex):
        ref = float((ref_ce[e] * weights[e]).sum() / weights[e].sum())
        assert abs(packed[e] - ref) <= ATOL, (e, packed[e], ref)


def test_rows_hold_each_example_once_with_own_segments(tmp_path):
    rows = _build(tmp_path, n=40, seq_len=200)
    ex = rows.examples
    b = rows.batch(np.arange(len(rows)))
    seen = []
    for r in range(len(rows)):
        items = rows.row_items(r)
        seg, pos = b["segment_ids"][r], b["positions"][r]
        used = int(sum(ex.lengths[items] - 1))
        assert used <= rows.seq_len
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all() and (pos[used:] == 0).all()
        start = 0
        for s, e in enumerate(items, 1):
            tok, trained = ex.tokens(e)
            n = len(tok) - 1
            np.testing.assert_array_equal(seg[start:start + n], s)
            np.testing.assert_array_equal(pos[start:start + n], np.arange(n))
            np.testing.assert_array_equal(b["input_ids"][r, start:start + n], tok[:-1])
            np.testing.assert_array_equal(b["targets"][r, start:start + n], tok[1:])  # next token, same example
            np.testing.assert_array_equal(b["loss_weights"][r, start:start + n], trained[1:])
            start += n
        seen += items.tolist()
    assert sorted(seen) == list(range(len(ex)))
    assert not b["loss_weights"][b["segment_ids"] == 0].any()


def test_best_fit_is_near_optimal_and_unpacked_mode_is_one_per_row(tmp_path):
    sizes = np.random.default_rng(0).integers(5, 120, 500)
    groups = best_fit_rows(sizes, 256)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert max(sizes[g].sum() for g in groups) <= 256
    lower_bound = -(-sizes.sum() // 256)
    assert len(groups) <= lower_bound + 2  # best-fit decreasing on small items is within a row or two of optimal
    rows = _build(tmp_path, n=10, seq_len=160, packing=False)
    assert len(rows) == 10 and all(len(rows.row_items(r)) == 1 for r in range(10))
    assert rows.efficiency() == rows.positions_used() / (10 * 160)


def test_segment_cap_bounds_rows_and_changes_nothing_below_it():
    """data.max_segments: no row holds more items than the cap (every item still placed once, within seq_len);
    a cap no row reaches gives the uncapped rows; the model is told the same bound (the composed run's row_segments)."""
    from ftjax import config as config_lib
    from ftjax.train.compose import compose, row_segments

    sizes = np.random.default_rng(1).integers(1, 12, 400)  # short items: uncapped rows hold ~40
    free = best_fit_rows(sizes, 256)
    capped = best_fit_rows(sizes, 256, max_items=8)
    assert max(len(g) for g in free) > 8
    assert max(len(g) for g in capped) <= 8
    assert sorted(i for g in capped for i in g) == list(range(400))
    assert max(sizes[g].sum() for g in capped) <= 256
    assert best_fit_rows(sizes, 256, max_items=max(len(g) for g in free)) == free
    c = config_lib.default_config()
    assert row_segments(compose(c)) == c.data.max_segments == 32
    c.data.packing = False
    assert row_segments(compose(c)) == 1
    c.objective = "dpo"
    assert row_segments(compose(c)) == 2
