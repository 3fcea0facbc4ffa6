"""The throughput formulations compute what the plain ones do: merged projection GEMMs (q/k/v and
gate/up, with and without LoRA, biases, adapter dropout) against each linear on its own, and the
grouped-query attention against jax.nn.dot_product_attention (segments, sliding windows, causal
block skipping, GQA groups), values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.lora import apply_lora
from ftjax.models.attention import attention_mask, grouped_attention
from ftjax.models.layers import Linear, fused_linears
from train_helpers import make_batch

RTOL, ATOL = 1e-5, 1e-6


class Three(nnx.Module):
    def __init__(self, bias: bool):
        kw = dict(use_bias=bias, rngs=nnx.Rngs(0))
        self.q_proj = Linear(12, 16, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(12, 8, axes=("embed", "kv"), **kw)
        self.v_proj = Linear(12, 8, axes=("embed", "kv"), **kw)


def build(bias: bool, targets, dropout: float = 0.0):
    m = Three(bias)
    if bias:
        for i, lin in enumerate((m.q_proj, m.k_proj, m.v_proj)):
            lin.bias[...] = jnp.arange(lin.out_features, dtype=jnp.float32) * 0.1 * (i + 1)
    if targets:
        apply_lora(m, 4, 8.0, targets=targets, dropout=dropout, rngs=nnx.Rngs(1))
        for path, var in nnx.iter_graph(m):
            if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":  # non-zero B: the adapter counts
                var[...] = jax.random.normal(jax.random.key(len(path)), var[...].shape) * 0.1
    return m


@pytest.mark.parametrize("bias,targets,dropout", [
    (False, None, 0.0), (True, None, 0.0), (False, "q_proj,k_proj,v_proj", 0.0), (True, "q_proj,v_proj", 0.0),
    (False, "k_proj", 0.0), (False, "q_proj,v_proj", 0.3)])
def test_fused_linears_match_separate(bias, targets, dropout):
    m = build(bias, targets, dropout)
    x = jax.random.normal(jax.random.key(2), (2, 5, 12))
    rngs = tuple(jax.random.split(jax.random.key(3), 3)) if dropout else (None, None, None)
    wrt = nnx.LoRAParam if targets else nnx.Param
    graphdef, params, rest = nnx.split(m, wrt, ...)

    def run(params, fused):
        mm = nnx.merge(graphdef, params, rest)
        lins = (mm.q_proj, mm.k_proj, mm.v_proj)
        outs = fused_linears(x, lins, rngs) if fused else [lin(x, r) for lin, r in zip(lins, rngs)]
        return outs, sum(jnp.sum(o * jnp.sin(o)) for o in outs)

    want, want_g = run(params, False), jax.grad(lambda p: run(p, False)[1])(params)
    got, got_g = run(params, True), jax.grad(lambda p: run(p, True)[1])(params)
    for a, b in zip(got[0], want[0]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), got_g, want_g)


def _output_and_vjp(f, q, k, v, do):
    """f(q, k, v) and its q/k/v cotangents for `do`, compiled as one program (op by op it takes ~30 s here)."""

    def both(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(do)

    return jax.jit(both)(q, k, v, do)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (3, 3), (4, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_grouped_attention_matches_jax(heads, kv_heads, window):
    b, t, h = 2, 32, 8
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, heads, h))
    k, v = jax.random.normal(kk, (b, t, kv_heads, h)), jax.random.normal(kv, (b, t, kv_heads, h))
    do = jax.random.normal(kd, (b, t, heads, h))
    batch = make_batch(b, t)
    pos = jnp.asarray(batch["positions"])
    mask = attention_mask(batch["segment_ids"], pos, batch["segment_ids"], pos, window)

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    for blocks in (1, 2, 4):
        slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        # block skipping needs query i at slot i: the mask built from slots, as the model does
        m = attention_mask(batch["segment_ids"], slots, batch["segment_ids"], slots, window) if blocks > 1 else mask
        r = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=m)) if blocks > 1 else ref
        want, want_grads = _output_and_vjp(r, q, k, v, do)
        got, got_grads = _output_and_vjp(lambda q, k, v: grouped_attention(q, k, v, m, blocks=blocks), q, k, v, do)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"blocks={blocks}")
        for a, e in zip(got_grads, want_grads):
            np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-5, err_msg=f"blocks={blocks}")


def test_grouped_attention_against_a_longer_cache():
    """Decode: t new queries against S > t cache slots, some empty (masked) and a fully masked row."""
    b, t, s, heads, kv_heads, h = 2, 3, 10, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (b, t, heads, h))
    k, v = jax.random.normal(kk, (b, s, kv_heads, h)), jax.random.normal(kv, (b, s, kv_heads, h))
    mask = jnp.arange(s)[None, None, None, :] < jnp.array([[[[6], [7], [0]]], [[[2], [3], [4]]]])
    np.testing.assert_allclose(grouped_attention(q, k, v, mask), jax.nn.dot_product_attention(q, k, v, mask=mask),
                               rtol=RTOL, atol=ATOL)
