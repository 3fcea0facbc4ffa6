"""KV-cache generation: batched, left-padded prompts, greedy / temperature / top-k / top-p, EOS stopping.

The prompt is prefilled in one `decode` call, then a jitted `lax.while_loop` runs one-token steps
until every row has emitted an EOS or `max_new_tokens` is reached. One compile per (batch, prompt
length bucket, max_new_tokens, sampling mode); prompt lengths are padded up to a bucket.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.models.llama import KVCache
from ftjax.placement import fetch, split_rows
from ftjax.sharding import active_platform

MIN_BUCKET = 16


def bucket_length(n: int) -> int:
    """Prompt length rounded up (powers of two from 16, then multiples of 512) to limit recompiles."""
    if n <= 512:
        return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-n // 512) * 512


@dataclasses.dataclass(frozen=True)
class PaddedPrompts:
    """Left-padded prompt batch: pads have segment id 0; positions start at 0 at each row's first token."""

    input_ids: np.ndarray  # [B, P] int32
    segment_ids: np.ndarray  # [B, P] int32
    positions: np.ndarray  # [B, P] int32
    lengths: np.ndarray  # [B] int32 real prompt lengths


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None) -> PaddedPrompts:
    """Left-pad token lists to `length` (default: the bucket of the longest prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt and every prompt needs at least one token")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    length = bucket_length(int(lengths.max())) if length is None else length
    if length < lengths.max():
        raise ValueError(f"pad length {length} is shorter than the longest prompt ({lengths.max()})")
    b = len(prompts)
    ids = np.full((b, length), pad_id, np.int32)
    segments = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, length - n:] = np.asarray(p, np.int32)
        segments[i, length - n:] = 1
        positions[i, length - n:] = np.arange(n, dtype=np.int32)
    return PaddedPrompts(ids, segments, positions, lengths)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0, use_top_p: bool = False
                  ) -> jax.Array:
    """Mask (to -inf) tokens outside the top-k and outside the smallest set whose probability reaches top_p.

    Like transformers' warpers, the most likely token is always kept, so top_p -> 0 is greedy.
    """
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
        keep = before < top_p
        keep = keep.at[..., 0].set(True)
        kept = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_desc, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def unrolled_decode() -> bool:
    """Whether the token loop runs the layers unrolled on per-layer weights sliced and folded once per call
    (`Llama.layer_slices`: one copy of the layer weights) rather than the layer scan, which copies every layer's
    weights out of the stack on every token. On CPU, where XLA makes that slice a copy (SmolLM2's decode step with
    this and the sampler below: 398 -> 223 ms, benchmarks/RESULTS.md). Elsewhere the scan: not measured there."""
    import jax

    # one device only: over several simulated CPU devices (tests/test_multihost.py: 2 processes x 2 devices beside
    # 1 x 4 on 2 cores) the unrolled loop's per-layer collectives met gloo's "collective mismatch" and XLA's 40 s
    # rendezvous timeout in the report's generation, where the scan's did not
    return active_platform() == "cpu" and jax.device_count() == 1


def first_argmax(logits_bv: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first of equal maxima), as a max then a min over the indices that reach
    it: two plain reductions, where XLA's CPU argmax (one reduction of value-index pairs) took 7x longer."""
    v = logits_bv.shape[-1]
    top = jnp.max(logits_bv, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits_bv == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)  # a row of NaNs has no maximum: the last token, not an index out of range


def _last_positive(x: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis (0 if none)."""
    return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1], dtype=jnp.int32), 0), axis=-1)


def draw(key: jax.Array, logits_bv: jax.Array, block: int = 256) -> jax.Array:
    """One token per row from softmax(logits) by the inverse of its CDF at one uniform a row: the vocabulary in
    blocks of `block` tokens, the block first, then the token inside it (two short cumulative sums).

    The same distribution as `jax.random.categorical` (up to fp32 rounding of the sums), with one random number a
    row where the Gumbel trick draws one per token (a decode step on SmolLM2's 49k vocabulary spent ~50 ms on
    them on CPU). A token of probability 0 (filtered to the dtype's minimum) is never drawn.
    """
    b, v = logits_bv.shape
    n = -(-v // block)
    p = jnp.exp(logits_bv.astype(jnp.float32) - jnp.max(logits_bv, axis=-1, keepdims=True).astype(jnp.float32))
    p = jnp.pad(p, ((0, 0), (0, n * block - v))).reshape(b, n, block)
    block_mass = jnp.sum(p, axis=-1)
    cdf = jnp.cumsum(block_mass, axis=-1)
    u = jax.random.uniform(key, (b, 1), jnp.float32) * cdf[:, -1:]
    j = jnp.minimum(jnp.sum(cdf <= u, axis=-1), _last_positive(block_mass))  # rounding never lands past the mass
    before = jnp.where(j > 0, jnp.take_along_axis(cdf, jnp.maximum(j - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    row = jnp.take_along_axis(p, j[:, None, None], axis=1)[:, 0]
    inside = before[:, None] + jnp.cumsum(row, axis=-1)
    i = jnp.minimum(jnp.sum(inside <= u, axis=-1), _last_positive(row))
    return (j * block + i).astype(jnp.int32)


def _sample(logits_bv, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    if greedy:
        return first_argmax(logits_bv)
    scaled = filter_logits(logits_bv / temperature, top_k, top_p, use_top_p)
    return draw(key, scaled)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p",
                                             "return_logits", "unrolled"))
def _generate(graphdef, state, input_ids, segment_ids, positions, lengths, eos_ids, pad_id, key, temperature,
              top_p, *, max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool, return_logits: bool,
              unrolled: bool):
    """Prefill then a while_loop of one-token decode steps; returns tokens [B, N] (and logits [B, N, V])."""
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    cache = KVCache.empty(model.config, b, p + max_new_tokens - 1)  # the last token is never fed back
    logits, cache = model.decode(input_ids, positions, segment_ids, cache, last_only=True)
    last = logits[:, -1]
    vocab = last.shape[-1]
    sample = functools.partial(_sample, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    all_logits = jnp.zeros((b, max_new_tokens, vocab), jnp.float32) if return_logits else None
    ones = jnp.ones((b, 1), jnp.int32)

    def emit(step, last, tokens, all_logits, done):
        """Choose token `step` from `last` logits (pad for finished rows) and record it."""
        token = sample(last, jax.random.fold_in(key, step), temperature, top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        if return_logits:
            all_logits = all_logits.at[:, step].set(last)
        done = done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        return token, tokens, all_logits, done

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    unrolled = unrolled and max_new_tokens > 1  # one new token: the prefill gave it, no loop to prepare for
    layers = model.layer_slices() if unrolled else None  # once, outside the token loop
    cache = cache.per_layer() if unrolled else cache

    def body(carry):
        step, token, tokens, all_logits, done, cache = carry
        pos = (lengths + step - 1)[:, None]  # the previous token's position
        logits, cache = model.decode(token[:, None], pos, ones, cache, layers=layers)
        token, tokens, all_logits, done = emit(step, logits[:, -1], tokens, all_logits, done)
        return step + 1, token, tokens, all_logits, done, cache

    token, tokens, all_logits, done = emit(0, last, tokens, all_logits, jnp.zeros((b,), bool))
    carry = (jnp.ones((), jnp.int32), token, tokens, all_logits, done, cache)
    _, _, tokens, all_logits, *_ = jax.lax.while_loop(cond, body, carry)
    return tokens, all_logits


def generate_tokens(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                    eos_ids: int | Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int = 0, return_logits: bool = False,
                    pad_to: int | None = None, unrolled: bool | None = None
                    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Token-level batched generation (the API eval uses).

    Returns int32 [B, max_new_tokens]: each row's new tokens, its EOS included, then `pad_id`.
    With `return_logits`, also the fp32 logits each token was chosen from, [B, max_new_tokens, V].
    `temperature == 0` is greedy; otherwise samples after top-k / top-p filtering, seeded by `seed`.
    `pad_to`: the prompts' padded length (default: the longest's bucket); a caller that generates several
    batches passes one length for all, so they share one compile with less padding than a bucket.
    `unrolled`: the token loop's layers unrolled on per-layer weights (default: `unrolled_decode()`, the platform's).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    eos = np.atleast_1d(np.asarray(eos_ids if eos_ids is not None else (), np.int32))
    eos = np.pad(eos, (0, -(-max(eos.size, 1) // 4) * 4 - eos.size), constant_values=-1)  # -1 matches nothing;
    # padded to a multiple of 4 so a different number of EOS ids rarely means a new compile
    graphdef, state = nnx.split(model)
    greedy = temperature == 0.0
    with split_rows(state) as split:  # rows over the mesh's batch axes; extra rows repeat the last prompt
        extra = [prompts[-1]] * (split.rows(len(prompts)) - len(prompts)) if len(prompts) else []
        batch = left_pad([*prompts, *extra], pad_id, pad_to)
        tokens, logits = _generate(
            graphdef, state, *split.put(batch.input_ids, batch.segment_ids, batch.positions, batch.lengths), eos,
            np.int32(pad_id), jax.random.key(seed), np.float32(temperature if not greedy else 1.0),
            np.float32(top_p), max_new_tokens=max_new_tokens, greedy=greedy, top_k=int(top_k),
            use_top_p=(not greedy) and top_p < 1.0, return_logits=return_logits,
            unrolled=unrolled_decode() if unrolled is None else bool(unrolled))
    n = len(prompts)
    tokens = fetch(tokens)[:n]
    return (tokens, fetch(logits)[:n]) if return_logits else tokens


def trim(row: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """A generated row up to (not including) its first EOS."""
    out = []
    for t in row:
        if int(t) in eos_ids:
            break
        out.append(int(t))
    return out


def _as_int_list(value: Any) -> list[int]:
    if value is None or value == "None":
        return []
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the tokenizer and the model's config (either may list several)."""
    ids = _as_int_list(getattr(tokenizer, "eos_token_id", None))
    extra = dict(getattr(getattr(model, "config", None), "extra", ()) or ())
    ids += _as_int_list(extra.get("eos_token_id"))
    return list(dict.fromkeys(ids))


def pad_id(tokenizer: Any, eos_ids: Sequence[int]) -> int:
    """The id prompts are padded with: the tokenizer's pad token, else the first EOS id, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)


def _is_conversation(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x) and len(x) > 0


def encode_chat(tokenizer: Any, conversation: str | Sequence[dict], chat: bool = True) -> list[int]:
    """Prompt token ids: the chat template with a generation prompt (a str is one user message)."""
    if not chat:
        return list(tokenizer(conversation)["input_ids"])
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model: Any, tokenizer: Any, messages_or_prompts: Any, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, chat: bool = True,
             eos_ids: Sequence[int] | None = None) -> str | list[str]:
    """Replies as text for one prompt/conversation or a list of them (chat template applied when `chat`).

    A str is a user message; a list of {"role", "content"} dicts is a conversation. Returns a str
    for a single input and a list for a list of inputs.
    """
    single = isinstance(messages_or_prompts, str) or _is_conversation(messages_or_prompts)
    items = [messages_or_prompts] if single else list(messages_or_prompts)
    prompts = [encode_chat(tokenizer, item, chat) for item in items]
    eos = list(eos_ids) if eos_ids is not None else stop_ids(model, tokenizer)
    tokens = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad_id(tokenizer, eos),
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    replies = [tokenizer.decode(trim(row, eos), skip_special_tokens=True) for row in tokens]
    return replies[0] if single else replies
