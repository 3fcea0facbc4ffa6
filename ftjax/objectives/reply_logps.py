"""Per-reply summed log-probs and token counts from hidden states and the output head, chunk by chunk.

A preference row packs whole pairs: the row's k-th pair is segments 2k+1 (chosen) and 2k+2 (rejected), and
`reply_ids` reads a position's reply from the batch: its segment id where its target is a trained reply token
(loss weight > 0), 0 elsewhere (prompts, padding). `token_logps` gives log p(target) per position with
only one chunk's fp32 logits [B, chunk, V] alive, like `ftjax.objectives.loss.fused_cross_entropy`: with a frozen
head (LoRA) the head's backward is done in the forward pass (d log p / dh per token is kept, then scaled by the
incoming cotangent); a trained head (full fine-tuning) recomputes each chunk's logits in the backward pass.
`pair_logps` then sums per reply, so packed pairs give the same log-probs as the same pairs unpacked.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ftjax.errors import ConfigError
from ftjax.objectives.pair_losses import ReplyLogps
from ftjax.sharding import constrain


def token_logps(h_btd: jax.Array, w: jax.Array, targets_bt: jax.Array, chunk: int, *, vocab_major: bool
                ) -> jax.Array:
    """log softmax(h·w)[target] per position [B, T] in fp32; `w` is [V, D] if vocab_major else [D, V]."""
    b, t, d = h_btd.shape
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    split = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    logp_nbc = _token_logps(split(h_btd), w, split(targets_bt.astype(jnp.int32)), vocab_major)
    return logp_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def _logits(h_bcd: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    return constrain(jnp.einsum(spec, h_bcd, w, preferred_element_type=jnp.float32), ("batch", "length", "act_vocab"))


def _chunk_logps(h_bcd, w, tg_bc, vocab_major):
    """(log p(target) [b, c], softmax [b, c, V], one-hot of the target) of one chunk, in fp32."""
    logits = _logits(h_bcd, w, vocab_major)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp_all, tg_bc[..., None], axis=-1, mode="clip")[..., 0]
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == tg_bc[..., None]
    return picked, jnp.exp(logp_all), onehot


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logps(h_nbcd, w, targets_nbc, vocab_major):
    return jax.lax.map(lambda xs: _chunk_logps(xs[0], w, xs[1], vocab_major)[0], (h_nbcd, targets_nbc))


def _dlogits_dh(dlogits, w, vocab_major, dt):
    return jnp.einsum("bcv,vd->bcd" if vocab_major else "bcv,dv->bcd", dlogits.astype(dt), w,
                      preferred_element_type=jnp.float32).astype(dt)


def _token_logps_fwd(h_nbcd, w, targets_nbc, vocab_major):
    need_dw = w.perturbed  # LoRA: the head is frozen, so its weight gradient is never computed
    h_nbcd, w, targets_nbc = h_nbcd.value, w.value, targets_nbc.value
    dt = h_nbcd.dtype
    if need_dw:  # the backward recomputes each chunk's logits: dw needs the incoming cotangent
        logp = jax.lax.map(lambda xs: _chunk_logps(xs[0], w, xs[1], vocab_major)[0], (h_nbcd, targets_nbc))
        return logp, (None, h_nbcd, w, targets_nbc)

    def one(xs):  # d log p / dh = (onehot − softmax) · w per token: the head's backward done here
        h, tg = xs
        picked, probs, onehot = _chunk_logps(h, w, tg, vocab_major)
        return picked, _dlogits_dh(onehot.astype(jnp.float32) - probs, w, vocab_major, dt)

    logp, dh_unit = jax.lax.map(one, (h_nbcd, targets_nbc))
    return logp, (dh_unit, None, None, None)


def _token_logps_bwd(vocab_major, res, g_nbc):
    dh_unit, h_nbcd, w, targets_nbc = res
    if isinstance(g_nbc, SymbolicZero):
        g_nbc = jnp.zeros(g_nbc.shape, jnp.float32)
    if dh_unit is not None:
        return (g_nbc[..., None].astype(dh_unit.dtype) * dh_unit, None, None)
    dt = h_nbcd.dtype

    def body(dw, xs):
        h, tg, g = xs
        _, probs, onehot = _chunk_logps(h, w, tg, vocab_major)
        dlogits = (g[..., None] * (onehot.astype(jnp.float32) - probs)).astype(dt)
        spec = "bcv,bcd->vd" if vocab_major else "bcd,bcv->dv"
        args = (dlogits, h) if vocab_major else (h, dlogits)
        dw = dw + jnp.einsum(spec, *args, preferred_element_type=jnp.float32)
        return dw, _dlogits_dh(dlogits, w, vocab_major, dt)

    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (h_nbcd, targets_nbc, g_nbc))
    return (dh, dw.astype(w.dtype), None)


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd, symbolic_zeros=True)


def reply_ids(batch: dict) -> jax.Array:
    """int32 [B, T]: the reply each position's target belongs to (2k+1 chosen, 2k+2 rejected), 0 where none; a
    preference batch carries no array for it, so the step's arguments are an SFT batch's."""
    return jnp.where(batch["loss_weights"] > 0, batch["segment_ids"], 0).astype(jnp.int32)


def chosen_weights(batch: dict) -> jax.Array:
    """The loss weights of the chosen replies only (odd segments): what a cross-entropy on them weighs."""
    return jnp.where(reply_ids(batch) % 2 == 1, batch["loss_weights"], 0.0)


def reply_sums(logp_bt: jax.Array, reply_ids_bt: jax.Array, max_pairs: int) -> tuple[jax.Array, jax.Array]:
    """(Σ log p, token count) per reply slot [B, 2·max_pairs]: slot 2k is pair k's chosen reply, 2k+1 its
    rejected one; positions with reply id 0 (or beyond max_pairs) are left out."""
    b, slots = logp_bt.shape[0], 2 * max_pairs
    ids = reply_ids_bt.astype(jnp.int32)
    ids = jnp.where((ids > 0) & (ids <= slots), ids, 0)  # slot 0 of each row collects the non-reply positions
    flat = (ids + (slots + 1) * jnp.arange(b, dtype=jnp.int32)[:, None]).reshape(-1)
    logp = jnp.where(ids > 0, logp_bt, 0.0).reshape(-1)  # NaN-safe: other positions contribute exactly 0
    sums = jax.ops.segment_sum(logp, flat, num_segments=b * (slots + 1)).reshape(b, slots + 1)
    counts = jax.ops.segment_sum(jnp.ones_like(logp), flat, num_segments=b * (slots + 1)).reshape(b, slots + 1)
    return sums[:, 1:], counts[:, 1:]


def pair_logps(logp_bt: jax.Array, reply_ids_bt: jax.Array, max_pairs: int) -> tuple[ReplyLogps, jax.Array]:
    """Per pair [B·max_pairs]: the ReplyLogps of the row's pairs, and which pairs exist (both replies have tokens)."""
    sums, counts = reply_sums(logp_bt, reply_ids_bt, max_pairs)
    b = sums.shape[0]
    sums, counts = sums.reshape(b * max_pairs, 2), counts.reshape(b * max_pairs, 2)
    valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    return ReplyLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1]), valid


def model_pair_logps(model, batch: dict, max_pairs: int, chunk: int = 512, *, rng=None
                     ) -> tuple[ReplyLogps, jax.Array]:
    """`pair_logps` of a Llama-style model (`hidden` + `head_weight`) on a preference batch (its input_ids,
    positions, segment_ids, targets and loss_weights)."""
    h = model.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"], rng=rng)
    return head_pair_logps(model, h, batch, max_pairs, chunk)


def head_pair_logps(model, h: jax.Array, batch: dict, max_pairs: int, chunk: int = 512
                    ) -> tuple[ReplyLogps, jax.Array]:
    """`pair_logps` from final hidden states `h` [B, T, D] already computed (the train step's forward pass)."""
    if not model.head_is_linear():
        raise ConfigError(f"preference objectives read the head as one linear; {model.config.model_type}'s "
                          "final-logit soft-cap is not supported there")
    w, vocab_major = model.head_weight()
    logp = token_logps(h.astype(w.dtype), w, batch["targets"], chunk, vocab_major=vocab_major)
    return pair_logps(logp, reply_ids(batch), max_pairs)
