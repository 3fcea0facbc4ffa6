"""Preference data: TRL's standard, conversational and implicit-prompt records give the same chat-templated
halves; the trained tokens are exactly the reply and its end-of-turn token; bad records and overlong pairs follow
data.on_bad_record / data.overlong for the pair as a whole; rows keep both halves of a pair together, and the
packed rows give the log-probs of the same pairs one per row."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from ftjax.data.packing import BATCH_KEYS
from ftjax.data.pair_rows import make_pair_rows
from ftjax.data.preference import (IDENTICAL, NO_TRAINED, OVERLONG, PreferenceFields, fit_pairs, read_pairs,
                                   read_pairs_tfds, tokenize_pairs, validate_pair)
from ftjax.data.records import MISSING_FIELDS
from ftjax.errors import DataError
from ftjax.objectives.reply_logps import chosen_weights, reply_ids
from data_helpers import data_part, smollm2_tokenizer, write_jsonl
from hf_helpers import tiny_tokenizer

F = PreferenceFields()


def _standard(i: int) -> dict:
    return {"prompt": f"w{i} w{i + 1}", "chosen": f"w{i + 2} w{i + 3}", "rejected": f"w{i + 4}"}


def _conversational(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"w{i} w{i + 1}"}],
            "chosen": [{"role": "assistant", "content": f"w{i + 2} w{i + 3}"}],
            "rejected": [{"role": "assistant", "content": f"w{i + 4}"}]}


def _implicit(i: int) -> dict:
    c = _conversational(i)
    return {"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}


def _tokens(records, tokenizer):
    pairs = tokenize_pairs([validate_pair(r, f"x.jsonl:{k + 1}", F) for k, r in enumerate(records)], tokenizer)
    return [(pairs.chosen.tokens(i), pairs.rejected.tokens(i)) for i in range(len(pairs))]


@pytest.mark.parametrize("tokenizer", [tiny_tokenizer, smollm2_tokenizer])
def test_the_three_formats_give_the_same_halves_trained_on_the_reply(tokenizer):
    tok = tokenizer()
    want = _tokens([_conversational(i) for i in range(3)], tok)
    for make in (_standard, _implicit):
        got = _tokens([make(i) for i in range(3)], tok)
        for (gc, gr), (wc, wr) in zip(got, want):
            for (ids, mask), (wids, wmask) in ((gc, wc), (gr, wr)):
                np.testing.assert_array_equal(ids, wids)
                np.testing.assert_array_equal(mask, wmask)
    for i, (chosen, rejected) in enumerate(want):
        for (ids, mask), reply in ((chosen, f"w{i + 2} w{i + 3}"), (rejected, f"w{i + 4}")):
            trained = tok.decode(ids[mask]).replace(" ", "")
            assert trained == (reply + "<|im_end|>").replace(" ", "")  # the reply and its end of turn, no more
            assert mask[-1] or tok.decode(ids[-1:]).strip() == ""  # nothing after but the template's whitespace


def test_implicit_prompt_keeps_a_multi_turn_prefix():
    prefix = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1"},
              {"role": "assistant", "content": "w2"}, {"role": "user", "content": "w3"}]
    pair = validate_pair({"chosen": prefix + [{"role": "assistant", "content": "w4"}],
                          "rejected": prefix + [{"role": "assistant", "content": "w5"}]}, "x:1", F)
    assert pair.chosen.messages[:-1] == pair.rejected.messages[:-1] == tuple((m["role"], m["content"]) for m in prefix)
    assert (pair.chosen.messages[-1], pair.rejected.messages[-1]) == (("assistant", "w4"), ("assistant", "w5"))
    (c, _), = _tokens([{"chosen": prefix + [{"role": "assistant", "content": "w4"}],
                        "rejected": prefix + [{"role": "assistant", "content": "w5"}]}], tiny_tokenizer())
    assert tiny_tokenizer().decode(c[0][c[1]]).split() == ["w4", "<|im_end|>"]  # the earlier reply w2 is context


BAD = [
    ({"prompt": "w1", "rejected": "w2"}, MISSING_FIELDS, "missing 'chosen'"),
    ({"chosen": "w1", "rejected": "w2"}, MISSING_FIELDS, "missing 'prompt'"),
    ({"prompt": "w1", "chosen": "w2", "rejected": "w2"}, IDENTICAL, "same reply"),
    (_implicit(1) | {"rejected": _implicit(1)["chosen"]}, IDENTICAL, "same conversation"),
    ({"prompt": [{"role": "user", "content": "w1"}], "chosen": [{"role": "user", "content": "w2"}],
      "rejected": [{"role": "assistant", "content": "w3"}]}, "wrong field type", "one {\"role\": \"assistant\""),
]


@pytest.mark.parametrize("record,reason,message", BAD)
def test_bad_records_fail_with_file_line_or_are_skipped_and_counted(tmp_path, record, reason, message):
    path = write_jsonl(tmp_path / "p.jsonl", [_standard(1), record, _standard(2)])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{__import__('re').escape(message)}"):
        read_pairs(path)
    read = read_pairs(path, on_bad_record="skip")
    assert len(read.records) == 2 and read.total == 3
    assert read.dropped == collections.Counter({reason: 1}) and read.first_dropped[reason].endswith("p.jsonl:2")


def _pairs(records, tok=None):
    return tokenize_pairs([validate_pair(r, f"p.jsonl:{k + 1}", F) for k, r in enumerate(records)],
                          tok or tiny_tokenizer())


def test_a_pair_too_long_for_one_row_follows_data_overlong_as_a_whole():
    long_reply = " ".join(f"w{k}" for k in range(10, 22))
    records = [_standard(1), {"prompt": "w1 w2", "chosen": long_reply, "rejected": "w3 w4"}]
    pairs = _pairs(records)
    seq_len = int(pairs.positions()[1]) - 1  # each half fits alone; together they do not
    assert pairs.chosen.lengths[1] - 1 <= seq_len and pairs.positions()[0] <= seq_len
    with pytest.raises(DataError, match=r"p\.jsonl:2: the pair needs"):
        fit_pairs(pairs, seq_len, "error", collections.Counter(), {})
    dropped, first = collections.Counter(), {}
    kept, truncated = fit_pairs(pairs, seq_len, "drop", dropped, first)
    assert len(kept) == 1 and dropped[OVERLONG] == 1 and first[OVERLONG] == "p.jsonl:2" and truncated == 0
    kept, truncated = fit_pairs(pairs, seq_len, "truncate", collections.Counter(), {})
    assert len(kept) == 2 and truncated == 1 and kept.positions()[1] == seq_len
    np.testing.assert_array_equal(kept.rejected.lengths, pairs.rejected.lengths)  # the short half is kept whole
    dropped = collections.Counter()
    kept, _ = fit_pairs(pairs, 12, "truncate", dropped, {})  # both halves lose their replies: dropped
    assert dropped[NO_TRAINED] == len(pairs) - len(kept) > 0


def test_rows_keep_both_halves_of_every_pair_together():
    pairs = _pairs([_standard(i) for i in range(1, 12)] + [_conversational(20)])
    rows = make_pair_rows(pairs, 40, packing=True, order=np.random.default_rng(0).permutation(len(pairs)))
    assert sorted(rows.items.tolist()) == list(range(len(pairs))) and len(rows) < len(pairs)
    batch = rows.batch(np.arange(len(rows)))
    for j in range(len(rows)):
        items = rows.row_items(j)
        seg, reply = batch["segment_ids"][j], np.asarray(reply_ids(batch))[j]
        assert seg.max() == 2 * len(items)
        for k, p in enumerate(items):
            for half, ex in enumerate((pairs.chosen, pairs.rejected)):
                s = 2 * k + 1 + half
                ids, mask = ex.tokens(p)
                np.testing.assert_array_equal(batch["input_ids"][j][seg == s], ids[:-1])
                np.testing.assert_array_equal(reply[seg == s] == s, mask[1:])
                np.testing.assert_array_equal(batch["positions"][j][seg == s], np.arange(len(ids) - 1))
                assert np.all(batch["loss_weights"][j][seg == s] == mask[1:])  # both replies' trained tokens
                assert np.all(np.asarray(chosen_weights(batch))[j][seg == s] == (mask[1:] if half == 0 else 0))
    assert rows.max_pairs == int(np.diff(rows.offsets).max())


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_packed_rows_give_the_log_probs_of_one_pair_per_row():
    import jax
    from flax import nnx

    from ftjax.lora import apply_lora
    from ftjax.objectives.reply_logps import model_pair_logps
    from train_helpers import TINY, tiny_model

    model = tiny_model(0, TINY.replace(vocab_size=128))
    apply_lora(model, 4, 8.0, rngs=nnx.Rngs(1))
    for path, p in nnx.iter_graph(model):
        if isinstance(p, nnx.LoRAParam) and path[-1] == "lora_b":
            p[...] = 0.1 * jax.random.normal(jax.random.key(len(path)), p[...].shape)
    pairs = _pairs([_standard(i) for i in range(1, 7)])
    packed = make_pair_rows(pairs, 64, packing=True)
    alone = make_pair_rows(pairs, 64, packing=False)
    assert len(packed) < len(alone) == len(pairs)
    got, valid = model_pair_logps(model, packed.batch(np.arange(len(packed))), packed.max_pairs, chunk=16)
    want, _ = model_pair_logps(model, alone.batch(np.arange(len(alone))), 1, chunk=16)
    order = np.full(len(pairs), -1)
    for j in range(len(packed)):
        for k, p in enumerate(packed.row_items(j)):
            order[p] = j * packed.max_pairs + k
    assert bool(np.asarray(valid)[order].all()) and int(np.asarray(valid).sum()) == len(pairs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a)[order], b, rtol=1e-4, atol=1e-4)


def test_tfds_jsonl_records_read_like_the_file(tmp_path):
    from ftjax.data import prepare_jsonl

    path = write_jsonl(tmp_path / "p.jsonl", [_standard(1), _conversational(2), _implicit(3)])
    data_dir = str(tmp_path / "tfds")
    prepare_jsonl({"train": [path]}, data_dir)
    from_tfds = read_pairs_tfds("jsonl_records", "train", data_dir)
    assert [p.chosen for p in from_tfds.records] == [p.chosen for p in read_pairs(path).records]
    assert [p.rejected for p in from_tfds.records] == [p.rejected for p in read_pairs(path).records]


def test_build_from_config_splits_packs_and_loads_through_the_train_iterator(tmp_path):
    from data_helpers import data_config
    from ftjax.train.compose import data_spec
    from ftjax.data import train_iterator
    from ftjax.data.preference_build import build_preference_datasets

    records = [_standard(i) for i in range(1, 30)] + [_conversational(40), {"prompt": "w1", "chosen": "w2"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(DataError, match=r"p\.jsonl:31: record is missing 'rejected'"):
        build_preference_datasets(data_part(path, seq_len=48), tiny_tokenizer())
    c = data_config(path, seq_len=48, eval_fraction=0.2, on_bad_record="skip")
    data = build_preference_datasets(data_spec(c), tiny_tokenizer(), vocab_size=128)
    s = data.summary
    assert (s.records, s.dropped, s.train_examples + s.eval_examples) == (31, {MISSING_FIELDS: 1}, 30)
    assert s.eval_examples == 6 and s.train_rows < s.train_examples  # pairs packed several to a row
    train_pairs = {int(p) for r in range(len(data.train)) for p in data.train.row_items(r)}
    assert train_pairs == set(range(s.train_examples))
    it = train_iterator(data.train, 4, seed=0, prefetch=0)
    batch = next(it)
    assert set(batch) == set(BATCH_KEYS)  # an SFT batch's arrays: the replies are read from them
    replies = np.asarray(reply_ids(batch))
    assert replies.shape == (4, 48) and replies.max() <= 2 * data.train.max_pairs
    chosen = (replies % 2 == 1)
    np.testing.assert_array_equal(np.asarray(chosen_weights(batch)) > 0, chosen)  # CE weights: the chosen replies only
    with pytest.raises(DataError, match="vocabulary"):
        build_preference_datasets(data_spec(c), tiny_tokenizer(), vocab_size=50)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_reference_log_probs_computed_once_ride_the_batch_and_sum_back_per_reply():
    import jax

    from ftjax.objectives.preference_term import batch_reference, pair_reference_logps
    from ftjax.objectives.reply_logps import model_pair_logps
    from train_helpers import TINY, tiny_model

    model = tiny_model(0, TINY.replace(vocab_size=128))
    pairs = _pairs([_standard(i) for i in range(1, 8)])
    rows = make_pair_rows(pairs, 64, packing=True)
    reference = pair_reference_logps(model, rows, batch_size=2, chunk=16)
    alone = make_pair_rows(pairs, 64, packing=False)
    want, _ = model_pair_logps(model, alone.batch(np.arange(len(alone))), 1, chunk=16)
    np.testing.assert_allclose(reference, np.stack([want.chosen, want.rejected], -1), rtol=1e-4, atol=1e-4)
    batch = rows.with_reference(reference).batch(np.arange(len(rows)))
    got = batch_reference({k: jax.numpy.asarray(v) for k, v in batch.items()}, rows.max_pairs)
    live, _ = model_pair_logps(model, batch, rows.max_pairs, chunk=16)
    for a, b in zip(got, live):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.all(reference < 0)  # every pair got its own (real, negative) log-probs


def test_conversational_halves_match_trl_tokenization_on_smollm2():
    """TRL 1.16's DPO tokenization of conversational records (its `_prepare_dataset`, on a stub trainer): the
    same prompt tokens, and ours trains its completion up to the end-of-turn token (TRL also trains the
    template's newline after it)."""
    import types

    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOTrainer

    tok = smollm2_tokenizer()
    records = [_conversational(i) for i in range(3)] + [_implicit(7)]
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(records[:3]), tok,
                                         args, "train")
    theirs = list(theirs) + list(DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok),
                                                             Dataset.from_list(records[3:]), tok, args, "train"))
    for ex, halves in zip(theirs, _tokens(records, tok)):
        for (ids, mask), completion in zip(halves, (ex["chosen_ids"], ex["rejected_ids"])):
            while tok.decode(completion[-1:]).strip() == "":
                completion = completion[:-1]
            n = len(ex["prompt_ids"])
            assert ids[:n + len(completion)].tolist() == ex["prompt_ids"] + completion
            np.testing.assert_array_equal(np.flatnonzero(mask), n + np.arange(len(completion)))
