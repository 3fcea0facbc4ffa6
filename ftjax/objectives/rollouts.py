"""On-policy sampling: completions of a batch of prompts from the current weights, with the log-probs and entropies
the sampling distribution gave each completion token. GRPO's rollouts and on-policy distillation read it.

`sample` generates through ftjax's KV-cache generation (`generate_tokens`: rows split over the mesh's batch axes,
every host, EOS stopping per row) from `nnx.merge(graphdef, trainable, frozen)`: the very arrays the train step
takes, so there is no second copy of the weights. The log-probs are then read in one teacher-forced pass over the
completions packed into rows (the same forward the train step runs), at the sampling temperature as TRL's
`_get_per_token_logps_and_entropies` reads them. Everything returned is host numpy, the same on every process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.generate import bucket_length, generate_tokens
from ftjax.objectives.reply_logps import token_logps
from ftjax.objectives.rollout_rows import pack_rollouts
from ftjax.placement import fetch, split_rows


@dataclasses.dataclass(frozen=True)
class Samples:
    """Completions of `prompts` (row i of each list: prompt i's completion) and what the policy gave their tokens."""

    prompts: list[list[int]]
    completions: list[list[int]]  # each up to and including its EOS; `max_new_tokens` tokens when truncated
    truncated: np.ndarray  # bool [N]: no EOS within max_new_tokens
    logps: list[np.ndarray]  # fp32 per completion token: log p(token) under the sampling policy at `temperature`
    entropies: list[np.ndarray]  # fp32 per completion token: the entropy of that distribution

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completions], np.int32)


def cut_at_eos(row: Sequence[int], eos_ids: Sequence[int]) -> tuple[list[int], bool]:
    """A generated row up to and including its first EOS, and whether it had none (truncated)."""
    out = []
    for t in row:
        out.append(int(t))
        if int(t) in eos_ids:
            return out, False
    return out, True


def sample(graphdef: nnx.GraphDef, trainable: Any, frozen: Any, prompts: Sequence[Sequence[int]], *, seed: int,
           max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, chunk: int = 512) -> Samples:
    """One completion per prompt (repeat a prompt G times for a group), sampled with `seed` (a pure function of
    it: the same seed gives the same completions on any mesh and any number of processes)."""
    if temperature <= 0:
        raise ValueError("on-policy sampling needs temperature > 0 (its log-probs are those of a distribution)")
    model = nnx.merge(graphdef, trainable, frozen)  # shares the arrays: no copy
    rows = generate_tokens(model, [list(p) for p in prompts], max_new_tokens=max_new_tokens, eos_ids=list(eos_ids),
                           pad_id=pad_id, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    cut = [cut_at_eos(r, eos_ids) for r in rows]
    completions = [c for c, _ in cut]
    logps, entropies = policy_token_stats(graphdef, trainable, frozen, prompts, completions, temperature, chunk)
    return Samples([list(p) for p in prompts], completions, np.array([t for _, t in cut], bool), logps, entropies)


def policy_token_stats(graphdef: nnx.GraphDef, trainable: Any, frozen: Any, prompts: Sequence[Sequence[int]],
                       completions: Sequence[Sequence[int]], temperature: float = 1.0, chunk: int = 512
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per completion token: (log p, entropy) of the model's distribution at `temperature`, teacher-forced on
    prompt + completion packed into rows (split over the mesh's batch axes like the train step's)."""
    seq_len = bucket_length(max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)) - 1)
    index = [np.full(len(c), i + 1, np.float32) for i, c in enumerate(completions)]  # which completion a position is
    packed = pack_rollouts(prompts, completions, np.zeros(len(prompts), np.float32), seq_len,
                           per_token={"item": index})
    with split_rows((trainable, frozen)) as split:
        rows = split.rows(packed["input_ids"].shape[0])
        arrays = [np.pad(packed[k], ((0, rows - packed[k].shape[0]), (0, 0)))
                  for k in ("input_ids", "positions", "segment_ids", "targets")]
        logp, entropy = _token_stats(graphdef, trainable, frozen, *split.put(*arrays), np.float32(temperature),
                                     chunk=chunk)
    logp, entropy = fetch(logp)[:len(packed["item"])], fetch(entropy)[:len(packed["item"])]
    item = packed["item"]
    return ([logp[item == i + 1] for i in range(len(completions))],
            [entropy[item == i + 1] for i in range(len(completions))])


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _token_stats(graphdef, trainable, frozen, input_ids, positions, segment_ids, targets, temperature, *, chunk: int):
    model = nnx.merge(graphdef, trainable, frozen)
    w, vocab_major = model.head_weight()
    h = scaled_hidden(model.hidden(input_ids, positions, segment_ids), w, temperature)
    return token_logps(h, w, targets, chunk, vocab_major=vocab_major), token_entropies(h, w, chunk, vocab_major)


def scaled_hidden(h: jax.Array, w: jax.Array, temperature) -> jax.Array:
    """Final hidden states divided by the temperature, in the head's dtype: (h / T) · w = logits / T."""
    return (h / temperature).astype(w.dtype)


def token_entropies(h_btd: jax.Array, w: jax.Array, chunk: int, vocab_major: bool) -> jax.Array:
    """The entropy of softmax(h · w) per position [B, T] in fp32, `chunk` positions of logits at a time."""
    b, t, d = h_btd.shape
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    h = jnp.pad(h_btd, ((0, 0), (0, n * chunk - t), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"

    def one(h_bcd):
        logp = jax.nn.log_softmax(jnp.einsum(spec, h_bcd, w, preferred_element_type=jnp.float32), axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    return jax.lax.map(one, h).swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
