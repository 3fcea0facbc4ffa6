"""Loader: per-process shares concatenate to the global batch, an epoch holds every example once,
a restored iterator state continues with exactly the next batch, eval batches are padded with zero weight."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_helpers import chat, data_part, smollm2_tokenizer, write_jsonl
from ftjax.data import BATCH_KEYS, build_datasets, eval_iterator, train_iterator
from ftjax.errors import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("loader") / "chats.jsonl",
                       [chat(i, turns=1 + i % 3, system=i % 5 == 0) for i in range(60)])
    return build_datasets(data_part(path, seq_len=192, eval_fraction=0.25), smollm2_tokenizer())


def _take(it, n):
    return [next(it) for _ in range(n)]


def _examples_in(batch, ex_index):
    """Example ids found in a batch, recovered from each segment's tokens (independent of row layout)."""
    found = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            toks = tuple(batch["input_ids"][r, where]) + (int(batch["targets"][r, where[-1]]),)
            found.append(ex_index[toks])
    return found


def test_process_shares_concatenate_to_the_global_batch(data):
    single = _take(train_iterator(data.train, 8, seed=3, process_index=0, process_count=1), 6)
    for count in (2, 4):
        shares = [_take(train_iterator(data.train, 8, seed=3, process_index=p, process_count=count), 6)
                  for p in range(count)]
        for step in range(6):
            for k in BATCH_KEYS:
                assert shares[0][step][k].shape[0] == 8 // count
                np.testing.assert_array_equal(np.concatenate([s[step][k] for s in shares]), single[step][k])


def test_an_epoch_holds_every_example_exactly_once(data):
    rows = data.train
    ex = rows.examples
    ex_index = {tuple(int(t) for t in ex.tokens(e)[0]): e for e in range(len(ex))}
    assert len(ex_index) == len(ex)  # generated examples are distinct
    b, count = 4, 2
    steps = -(-len(rows) // b) * 2  # two epochs' worth of global batches
    shares = [_take(train_iterator(rows, b, seed=11, process_index=p, process_count=count), steps)
              for p in range(count)]
    global_rows = [{k: np.concatenate([s[step][k] for s in shares]) for k in BATCH_KEYS} for step in range(steps)]
    flat = {k: np.concatenate([g[k] for g in global_rows]) for k in BATCH_KEYS}
    epochs = [{k: v[i * len(rows):(i + 1) * len(rows)] for k, v in flat.items()} for i in range(2)]
    seen = [_examples_in(e, ex_index) for e in epochs]
    assert sorted(seen[0]) == list(range(len(ex)))  # nothing lost, nothing repeated
    assert sorted(seen[1]) == list(range(len(ex)))
    assert seen[0] != seen[1]  # each epoch is shuffled anew
    other = _take(train_iterator(rows, b, seed=12, process_index=0, process_count=1), 3)
    again = _take(train_iterator(rows, b, seed=11, process_index=0, process_count=1), 3)
    assert any((o["input_ids"] != a["input_ids"]).any() for o, a in zip(other, again))  # the seed matters
    np.testing.assert_array_equal(again[0]["input_ids"], global_rows[0]["input_ids"])  # and decides everything


def test_num_epochs_bounds_the_iterator(data):
    it = train_iterator(data.train, 4, seed=0, num_epochs=2, process_index=0, process_count=1)
    assert len(it) == 2 * len(data.train) // 4
    assert len(list(it)) == len(it)


@pytest.mark.parametrize("prefetch", [0, 4])
def test_restored_state_continues_with_the_next_batch(data, prefetch):
    n, k = 3 * len(data.train) // 8 + 2, 5  # runs past an epoch boundary
    full = _take(train_iterator(data.train, 8, seed=5, process_index=0, process_count=1), n)
    it = train_iterator(data.train, 8, seed=5, process_index=0, process_count=1, prefetch=prefetch)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # it must survive JSON
    assert state["batches"] == k
    resumed = train_iterator(data.train, 8, seed=5, process_index=0, process_count=1, prefetch=prefetch)
    resumed.set_state(state)
    for want, got in zip(full[k:], _take(resumed, n - k)):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    other = train_iterator(data.train, 8, seed=6, process_index=0, process_count=1)
    with pytest.raises(DataError, match="saved seed is 5"):
        other.set_state(state)


def test_eval_batches_fixed_order_padded_with_zero_weight(data):
    rows = data.eval
    b = 6
    assert len(rows) % b  # the last batch needs padding
    single = list(eval_iterator(rows, b, process_index=0, process_count=1))
    assert len(single) == -(-len(rows) // b)
    everything = rows.batch(np.arange(len(rows)))
    flat = {k: np.concatenate([s[k] for s in single]) for k in BATCH_KEYS}
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(flat[k][:len(rows)], everything[k])  # fixed order, every row once
        assert not flat[k][len(rows):].any()  # padding rows: zero weight, segment 0
    shares = [list(eval_iterator(rows, b, process_index=p, process_count=2)) for p in range(2)]
    for step in range(len(single)):
        np.testing.assert_array_equal(np.concatenate([s[step]["input_ids"] for s in shares]),
                                      single[step]["input_ids"])


def test_global_arrays_over_a_batch_sharding(data):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    host = next(train_iterator(data.train, 8, seed=1, process_index=0, process_count=1))
    glob = next(train_iterator(data.train, 8, seed=1, sharding=sharding))
    for k in BATCH_KEYS:
        assert isinstance(glob[k], jax.Array) and glob[k].sharding == sharding
        assert glob[k].dtype == host[k].dtype and glob[k].shape == host[k].shape
        np.testing.assert_array_equal(np.asarray(glob[k]), host[k])
    ev = next(eval_iterator(data.eval, 8, sharding=sharding))
    assert ev["loss_weights"].sharding == sharding


def test_batch_size_must_split_over_processes(data):
    with pytest.raises(DataError, match="multiple of the process count"):
        train_iterator(data.train, 6, seed=0, process_index=0, process_count=4)
