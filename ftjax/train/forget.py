"""Forgetting control in the loop: the step-0 base copy the regularizers pull toward, and the retain data.

The control data: the base model's greedy replies to the control prompts (`forget.control`, by default
the bundled set disjoint from the retain prompts forgetting is measured on), generated once before the first
step and cached in the workdir (a resumed run reads the same tokens). Replay mixes
`WORKDIR/control_replay.jsonl` (those prompts with the user's own replies where the file gives them, else the
base's) into the training data; the KL term reads the base's reply tokens from its own iterator,
checkpointed like the train iterator.
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

from ftjax.evaluation.forgetting import BaseReplies, base_replies


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
    from ftjax.evaluation.base import base_view

    if config.method == "lora":
        return base_view(state.model())
    return nnx.merge(state.graphdef, state.trainable if base_trainable is None else base_trainable, state.frozen)


CONTROL_CACHE = "control_replies.json"
CONTROL_REPLAY = "control_replay.jsonl"


@dataclasses.dataclass
class RetainData:
    """The base model's replies to the control prompts (the KL term's batches) and the replay file, if any."""

    replies: BaseReplies
    replay_path: str | None


def retain_data(config, tokenizer, workdir: Path, state, base_trainable) -> RetainData | None:
    """What replay and the KL term need (None when neither is on); generation happens here, once per workdir."""
    from ftjax.evaluation.replay import write_replay_file
    from ftjax.evaluation.retain import CONTROL_BUNDLED, load_retain
    from ftjax.evaluation.run import model_id

    f = config.forget
    if not (f.replay_fraction > 0 or f.kl_weight > 0):
        return None
    items = load_retain(f.control, default=CONTROL_BUNDLED, key="forget.control")
    start = time.perf_counter()
    replies = base_replies(base_model(config, state, base_trainable), tokenizer, items,
                           max_new_tokens=f.max_new_tokens, cache=workdir / CONTROL_CACHE,
                           model_id=model_id(config), write=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(f"forget: base replies to {len(items)} control prompts ({time.perf_counter() - start:.0f} s)",
              flush=True)
    replay = write_replay_file(workdir / CONTROL_REPLAY, replies) if f.replay_fraction > 0 else None
    return RetainData(replies, replay)


def retain_batches(config, retain: RetainData | None, sharding):
    """The KL term's retain batches (same shape as train batches), or None without forget.kl_weight."""
    if not config.forget.kl_weight:
        return None
    from ftjax.evaluation.replay import reply_iterator

    return reply_iterator(retain.replies, seq_len=config.data.seq_len, batch_size=config.train.batch_size,
                          seed=config.seed, packing=config.data.packing, sharding=sharding,
                          prefetch=config.data.prefetch)


def retain_fingerprint(config, retain: RetainData | None) -> dict:
    """Provenance of the KL term's retain tokens, checked on resume like the training data."""
    if not config.forget.kl_weight:
        return {}
    text = json.dumps([retain.replies.prompt_ids, retain.replies.reply_ids]).encode()
    return {"retain_replies": {"size": len(text), "sha256": hashlib.sha256(text).hexdigest()}}
