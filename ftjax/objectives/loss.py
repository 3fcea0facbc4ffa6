"""Token-weighted cross-entropy computed chunk by chunk over the sequence.

Only one chunk's fp32 logits [B, chunk, V] exist at a time, forward and backward. The generic
`chunked_cross_entropy` (any logits function) rematerializes each chunk's logits in the backward
pass (`jax.checkpoint`); `fused_cross_entropy` (a linear head, what the train step uses) computes
the head's gradients in the forward pass instead, so the logits are computed once.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ftjax.sharding import constrain


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, in fp32."""
    logits = logits_btv.astype(jnp.float32)
    idx = targets_bt[..., None].astype(jnp.int32)
    picked = jnp.take_along_axis(logits, idx, axis=-1, mode="clip")[..., 0]  # ignored targets may be -100
    return jax.nn.logsumexp(logits, axis=-1) - picked


def length_chunks(chunk: int, *xs_bt: jax.Array) -> tuple[jax.Array, ...]:
    """Each [B, T, ...] array zero-padded to a whole number of length chunks (chunk clipped to [1, T]) and
    split as [n, B, chunk, ...], the scan axis first: the prologue of every chunked loss. Padded positions
    carry weight 0."""
    b, t = xs_bt[0].shape[:2]
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(x: jax.Array) -> jax.Array:
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    return tuple(split(x) for x in xs_bt)


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], h_btd: jax.Array, targets_bt: jax.Array,
                          weights_bt: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of weight · CE, sum of weight) over all tokens, from hidden states and a logits head.

    Sums, not a mean, so micro-batches combine into one token-weighted mean over the whole batch.
    """
    weights_bt = weights_bt.astype(jnp.float32)
    h_nbcd, targets_nbc, weights_nbc = length_chunks(chunk, h_btd, targets_bt, weights_bt)

    @jax.checkpoint
    def one_chunk(h_bcd, targets_bc, weights_bc):
        ce = token_cross_entropy(logits_fn(h_bcd), targets_bc)
        return jnp.sum(jnp.where(weights_bc != 0, ce * weights_bc, 0.0))  # NaN weights still propagate

    def body(total, xs):
        return total + one_chunk(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_nbcd, targets_nbc, weights_nbc))
    return total, jnp.sum(weights_bt)


def head_cross_entropy(model, h_btd: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array, chunk: int
                       ) -> jax.Array:
    """Σ weight · CE through `model`'s head: fused with the head's matmul when the model exposes it as one
    linear (`head_weight()`, no logits recompute), else chunked over any `model.logits`."""
    if hasattr(model, "head_weight") and model.head_is_linear():  # an output soft-cap makes it no linear
        w, vocab_major = model.head_weight()
        return fused_cross_entropy(h_btd.astype(w.dtype), w, targets_bt, weights_bt, chunk,
                                   vocab_major=vocab_major)[0]
    return chunked_cross_entropy(model.logits, h_btd, targets_bt, weights_bt, chunk)[0]


def fused_cross_entropy(h_btd: jax.Array, w: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array, chunk: int,
                        *, vocab_major: bool) -> tuple[jax.Array, jax.Array]:
    """Like `chunked_cross_entropy` for a linear head `w` ([V, D] if vocab_major, else [D, V]), with the
    head's backward done in the forward pass, chunk by chunk: softmax - onehot gives dlogits at once,
    so dh (and dw, only when w is differentiated) are computed there and the logits are never
    recomputed nor kept. h and w come in the compute dtype; logits and their gradients are fp32."""
    weights_bt = weights_bt.astype(jnp.float32)
    h_nbcd, targets_nbc, weights_nbc = length_chunks(chunk, h_btd, targets_bt, weights_bt)
    total = _fused_ce(h_nbcd, w, targets_nbc, weights_nbc, vocab_major)
    return total, jnp.sum(weights_bt)


def _head_logits(h_bcd: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    return constrain(jnp.einsum(spec, h_bcd, w, preferred_element_type=jnp.float32), ("batch", "length", "act_vocab"))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(h_nbcd, w, targets_nbc, weights_nbc, vocab_major):
    def body(total, xs):
        h, tg, wt = xs
        ce = token_cross_entropy(_head_logits(h, w, vocab_major), tg)
        return total + jnp.sum(jnp.where(wt != 0, ce * wt, 0.0)), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_nbcd, targets_nbc, weights_nbc))[0]


def _fused_ce_fwd(h_nbcd, w, targets_nbc, weights_nbc, vocab_major):
    need_dw = w.perturbed  # LoRA: the head is frozen, so its weight gradient is never computed
    h_nbcd, w, targets_nbc, weights_nbc = (x.value for x in (h_nbcd, w, targets_nbc, weights_nbc))
    dt = h_nbcd.dtype

    def body(carry, xs):
        total, dw = carry
        h_bcd, tg, wt = xs
        b, c, d = h_bcd.shape
        # Rows flattened: the head's weight gradient is then one GEMM over a single contracting axis
        # (XLA CPU transposes the whole [rows, V] dlogits for a two-axis contraction).
        h, tg, wt = h_bcd.reshape(b * c, d), tg.reshape(b * c), wt.reshape(b * c)
        logits = jnp.einsum("rd,vd->rv" if vocab_major else "rd,dv->rv", h, w, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "act_vocab"))  # rows keep the batch's sharding (b major)
        # One exp pass serves both the log-sum-exp and the softmax; the row sums are a matrix-vector
        # product (faster than XLA CPU's reduction over a [rows, V] array).
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)
        ones = jnp.ones((e.shape[-1],), e.dtype)
        sums = jnp.dot(e, ones, precision=jax.lax.Precision.HIGHEST)[:, None]  # fp32 sums on TPU/GPU too
        lse = (m + jnp.log(sums))[:, 0]
        idx = tg[..., None].astype(jnp.int32)
        picked = jnp.take_along_axis(logits, idx, axis=-1, mode="clip")[..., 0]
        total = total + jnp.sum(jnp.where(wt != 0, (lse - picked) * wt, 0.0))  # NaN weights still propagate
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == idx
        scale = jnp.where(wt != 0, wt, 0.0)[..., None]
        dlogits = (scale * (e / sums - onehot)).astype(dt)
        dh = jnp.einsum("rv,vd->rd" if vocab_major else "rv,dv->rd", dlogits, w,
                        preferred_element_type=jnp.float32).astype(dt)
        if need_dw:
            spec = "rv,rd->vd" if vocab_major else "rd,rv->dv"
            args = (dlogits, h) if vocab_major else (h, dlogits)
            dw = dw + jnp.einsum(spec, *args, preferred_element_type=jnp.float32)
        return (total, dw), dh.reshape(b, c, d)

    dw0 = jnp.zeros(w.shape, jnp.float32) if need_dw else None
    (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), (h_nbcd, targets_nbc, weights_nbc))
    return total, (dh, None if dw is None else dw.astype(w.dtype))


def _fused_ce_bwd(vocab_major, res, g):
    dh, dw = res
    g = jnp.zeros((), jnp.float32) if isinstance(g, SymbolicZero) else g
    return (g.astype(dh.dtype) * dh, None if dw is None else g.astype(dw.dtype) * dw, None, None)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)
