"""Forgetting control in the loop: the step-0 base copy the regularizers pull toward, and the retain data.

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
from ftjax.evaluation.run import model_id


def wants_base_copy(config, evaluating: bool) -> bool:
    """Full fine-tuning keeps the step-0 weights for the L2/KL terms and the forgetting metrics; LoRA never
    does (its base is the same model with the adapters off or zeroed)."""
    f = config.forget
    return config.method == "full" and (evaluating or f.kl_weight > 0 or f.l2_weight > 0)


def base_copy(state) -> Any:
    """A copy of the trainable weights, in their shardings, taken before the first (donating) step."""
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state.shardings.trainable)
    return copy(state.trainable)


def base_model(config, state, base_trainable) -> nnx.Module:
    """The base model: the step-0 copy (full), the current weights before any step, or the LoRA view."""
    if config.method == "lora":
        return base_view(state.model())
    return nnx.merge(state.graphdef, state.trainable if base_trainable is None else base_trainable, state.frozen)


CONTROL_CACHE = "control_replies.json"
CONTROL_SAMPLES = "control_samples.json"
CONTROL_REPLAY = "control_replay.jsonl"


@dataclasses.dataclass
class RetainData:
    """The base model's greedy replies to the control prompts (the KL term's batches) and the replay file."""

    replies: BaseReplies | None  # greedy: for the KL term, or replay at temperature 0; else None
    replay_path: str | None  # None without forget.replay_fraction


def retain_data(config, tokenizer, workdir: Path, state, base_trainable) -> RetainData | None:
    """What replay and the KL term need (None when neither is on); generation happens here, once per workdir."""
    f = config.forget
    if not (f.replay_fraction > 0 or f.kl_weight > 0):
        return None
    items = load_retain(f.control, default=CONTROL_BUNDLED, key="forget.control")
    base = base_model(config, state, base_trainable)
    main = jax.process_index() == 0

    def generate(todo, cache, what, **sampling):
        start = time.perf_counter()
        out = base_replies(base, tokenizer, todo, max_new_tokens=f.max_new_tokens, cache=workdir / cache,
                           model_id=model_id(config), write=main, **sampling)
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
                                temperature=f.replay_temperature, samples=f.replay_samples, seed=config.seed)
                       if todo else BaseReplies([], [], [], [], f.max_new_tokens))
            replay = write_replay_file(workdir / CONTROL_REPLAY, sampled, own)
    return RetainData(greedy, replay)


def retain_batches(config, retain: RetainData | None, sharding):
    """The KL term's retain batches (same shape as train batches), or None without forget.kl_weight."""
    if not config.forget.kl_weight:
        return None
    return reply_iterator(retain.replies, seq_len=config.data.seq_len, batch_size=config.train.batch_size,
                          seed=config.seed, packing=config.data.packing,
                          max_segments=config.data.max_segments, sharding=sharding,
                          prefetch=config.data.prefetch)


def retain_fingerprint(config, retain: RetainData | None) -> dict:
    """Provenance of the KL term's retain tokens, checked on resume like the training data."""
    if not config.forget.kl_weight:
        return {}
    text = json.dumps([retain.replies.prompt_ids, retain.replies.reply_ids]).encode()
    return {"retain_replies": {"size": len(text), "sha256": hashlib.sha256(text).hexdigest()}}
