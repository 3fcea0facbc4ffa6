"""Replay data against forgetting: the retain prompts with replies to keep, as training JSONL and batches.

A retain item's reply is the user's own when their retain file gives one, else the base model's (sampled
at `forget.replay_temperature`, or greedy). `replay_mixture` mixes the file into `data.train` at
`forget.replay_fraction` of the examples (the training loop instead passes it to
`build_datasets(replay=...)`, which keeps every task example);
`reply_iterator` gives batches of the base's own reply tokens for the KL-to-base term (train-batch shape).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftjax.data import train_iterator
from ftjax.data.examples import Examples
from ftjax.data.mixture import parse_sources
from ftjax.data.packing import make_rows
from ftjax.data.records import UNFINISHED, Fields, read_file
from ftjax.data.tokenize import tokenize_records
from ftjax.errors import ConfigError, DataError
from ftjax.evaluation.conversations import as_messages
from ftjax.evaluation.forgetting import BaseReplies
from ftjax.evaluation.retain import RetainItem

REPLAY_NAME = "replay.jsonl"


def write_replay_file(path: str | os.PathLike, replies: BaseReplies, own: Sequence[RetainItem] = ()) -> str:
    """JSONL chat records {"messages": prompt turns + the reply to keep}, written atomically; returns the path.

    Each item of `replies` keeps the user's own reply when it has one, else the base's; the items of `own`
    (with user replies, not generated for) are added as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    pairs = [(item, r, replies.is_unfinished(i)) for i, (item, r) in enumerate(zip(replies.items, replies.replies))]
    for item, base_reply, cut in pairs + [(item, "", False) for item in own]:
        reply = item.reply if item.reply is not None else base_reply
        if not reply.strip():
            continue  # an empty reply cannot be trained on (the pipeline would refuse the record)
        msgs = as_messages(item.prompt) + [{"role": "assistant", "content": reply}]
        cut = cut and item.reply is None  # a base reply the token budget cut: its end-of-turn is not trained
        lines.append(json.dumps({"messages": msgs, **({UNFINISHED: True} if cut else {})}, ensure_ascii=False)
                     + "\n")
    if not lines:
        raise DataError("replay: every retain reply is empty; nothing to replay")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return str(path)


def replay_mixture(train_spec: str, replay_path: str, fraction: float) -> str:
    """`data.train` with the replay file making up `fraction` of each pass (the other weights keep their ratios)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"forget.replay_fraction must be in (0, 1) to mix replay data, got {fraction}")
    sources = parse_sources(train_spec)
    total = sum(s.weight for s in sources)
    parts = [f"{s.path}:{(1.0 - fraction) * s.weight / total:.6g}" for s in sources]
    return ",".join(parts + [f"{replay_path}:{fraction:.6g}"])


def retain_iterator(replay_path: str, tokenizer: Any, *, seq_len: int, batch_size: int, seed: int,
                    packing: bool = True, sharding: Any = None, prefetch: int = 2):
    """Endless shuffled batches of the replay file (reply tokens weighted), the same shape as train batches.

    Examples longer than seq_len+1 tokens are cut to fit (only the KL on their first tokens is measured).
    """
    records = read_file(replay_path, Fields()).records
    ex = tokenize_records(records, tokenizer, loss_on="last_assistant")
    return _batches(ex, replay_path, seq_len=seq_len, batch_size=batch_size, seed=seed, packing=packing,
                    sharding=sharding, prefetch=prefetch)


def reply_iterator(replies: BaseReplies, *, seq_len: int, batch_size: int, seed: int, packing: bool = True,
                   sharding: Any = None, prefetch: int = 2):
    """Endless shuffled batches of the retain prompts + the base model's own reply tokens (weighted), for the
    KL-to-base term: the very positions `forgetting.kl_to_base` measures, token ids exactly as generated."""
    seqs = replies.sequences()
    lengths = np.asarray([len(ids) for ids, _ in seqs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = len(seqs)
    ex = Examples(np.concatenate([ids for ids, _ in seqs]).astype(np.int32),
                  np.concatenate([t for _, t in seqs]).astype(bool), starts, lengths, np.zeros(n, np.uint64),
                  np.zeros(n, np.int32), np.arange(1, n + 1, dtype=np.int64), np.asarray(["retain replies"]))
    return _batches(ex, "the base model's retain replies", seq_len=seq_len, batch_size=batch_size, seed=seed,
                    packing=packing, sharding=sharding, prefetch=prefetch)


def _batches(ex: Examples, what: str, *, seq_len: int, batch_size: int, seed: int, packing: bool, sharding: Any,
             prefetch: int):
    ex = ex.with_lengths(np.minimum(ex.lengths, seq_len + 1))
    ex = ex.take(np.flatnonzero(ex.trained_targets() > 0))  # a reply cut off entirely has nothing to measure
    if not len(ex):
        raise DataError(f"forget.kl_weight needs retain data: no reply tokens of {what} fit in "
                        f"data.seq_len={seq_len}")
    order = np.random.default_rng([seed, 0x72657461]).permutation(len(ex))
    rows = make_rows(ex, seq_len, packing, order)
    return train_iterator(rows, batch_size, seed=seed, sharding=sharding, prefetch=prefetch)
