"""Forgetting control in the loop: the step-0 copy the regularizers pull toward, and the retain data.

The control data: the base model's replies to the control prompts (`forget.control`, by default the bundled
set disjoint from the retain prompts forgetting is measured on), generated once before the first step and
cached in the workdir (a resumed run reads the same tokens). Replay mixes `WORKDIR/control_replay.jsonl`
into the training data: those prompts with the user's own replies where the file gives them, else
`forget.replay_samples` replies sampled from the base at `forget.replay_temperature`. Cross-entropy on
samples of the base is, in expectation, KL(base ‖ tuned) plus a constant, the very quantity forgetting is
measured by; on the base's greedy reply it only pulls toward the mode (measured: KL barely moves,
benchmarks/RESULTS.md "Forgetting controls"). The KL term reads the base's greedy reply tokens from its own
iterator, checkpointed like the train iterator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.data.replay import BaseReplies, reply_iterator, write_replay_file
from ftjax.data.retain import CONTROL_BUNDLED, load_retain
from ftjax.evaluation.base import base_view
from ftjax.evaluation.forgetting import base_replies
from ftjax.methods import Method


def keeps_start_copy(method: Method, forget: Any, evaluating: bool) -> bool:
    """Full fine-tuning keeps the step-0 weights for the L2/KL terms and the forgetting metrics; LoRA never
    does (its pre-trained model is the same model with the adapters off or zeroed). `forget`: its weights."""
    return method.keeps_start_copy and (evaluating or forget.kl_weight > 0 or forget.l2_weight > 0)


def start_copy(state) -> Any:
    """A copy of the trainable weights, in their shardings, taken before the first (donating) step."""
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state.shardings.trainable)
    return copy(state.trainable)


def pretrained_model(method: Method, state, start_copy) -> nnx.Module:
    """The model before training: the step-0 copy (full), the current weights before any step, or LoRA's view
    with the adapters off."""
    if not method.keeps_start_copy:
        return base_view(state.model())
    return nnx.merge(state.graphdef, state.trainable if start_copy is None else start_copy, state.frozen)


CONTROL_CACHE = "control_replies.json"
CONTROL_SAMPLES = "control_samples.json"
CONTROL_REPLAY = "control_replay.jsonl"


@dataclasses.dataclass
class RetainData:
    """The base model's greedy replies to the control prompts (the KL term's batches) and the replay file."""

    replies: BaseReplies | None  # greedy: for the KL term, or replay at temperature 0; else None
    replay_path: str | None  # None without forget.replay_fraction


def retain_data(run: Any, tokenizer, workdir: Path, state, start_copy) -> RetainData | None:
    """What replay and the KL term need (None when neither is on); generation happens here, once per workdir.
    `run`: the composed run (ftjax.train.compose.Run)."""
    f = run.forget
    if not (f.replay_fraction > 0 or f.kl_weight > 0):
        return None
    items = load_retain(f.control, default=CONTROL_BUNDLED, key="forget.control")
    pretrained = pretrained_model(run.method, state, start_copy)
    main = jax.process_index() == 0

    def generate(todo, cache, what, **sampling):
        start = time.perf_counter()
        out = base_replies(pretrained, tokenizer, todo, max_new_tokens=f.max_new_tokens, cache=workdir / cache,
                           model_id=run.model_id, write=main, **sampling)
        if main:
            print(f"forget: {what} ({time.perf_counter() - start:.0f} s)", flush=True)
        return out

    greedy = (generate(items, CONTROL_CACHE, f"base greedy replies to {len(items)} control prompts")
              if f.kl_weight > 0 or (f.replay_fraction > 0 and f.replay_temperature == 0) else None)
    replay = None
    if f.replay_fraction > 0:
        if f.replay_temperature == 0:
            replay = write_replay_file(workdir / CONTROL_REPLAY, greedy)
        else:
            todo = [it for it in items if it.reply is None]
            reps = f.replay_samples if todo else 1  # every prompt weighs the same in the replay file
            own = [it for it in items if it.reply is not None for _ in range(reps)]
            sampled = (generate(todo, CONTROL_SAMPLES, f"{f.replay_samples} base samples at temperature "
                                f"{f.replay_temperature:g} for each of {len(todo)} control prompts",
                                temperature=f.replay_temperature, samples=f.replay_samples, seed=run.schedule.seed)
                       if todo else BaseReplies([], [], [], [], f.max_new_tokens))
            replay = write_replay_file(workdir / CONTROL_REPLAY, sampled, own)
    return RetainData(greedy, replay)


def retain_batches(run: Any, retain: RetainData | None, sharding):
    """The KL term's retain batches (same shape as train batches), or None without forget.kl_weight."""
    if not run.forget.kl_weight:
        return None
    s = run.schedule
    return reply_iterator(retain.replies, seq_len=s.seq_len, batch_size=s.batch_size, seed=s.seed,
                          packing=run.feed.packing,
                          max_segments=run.feed.max_segments, sharding=sharding, prefetch=run.feed.prefetch)


def retain_fingerprint(kl_weight: float, retain: RetainData | None) -> dict:
    """Provenance of the KL term's retain tokens (with forget.kl_weight), checked on resume like the training
    data."""
    if not kl_weight:
        return {}
    text = json.dumps([retain.replies.prompt_ids, retain.replies.reply_ids]).encode()
    return {"retain_replies": {"size": len(text), "sha256": hashlib.sha256(text).hexdigest()}}
