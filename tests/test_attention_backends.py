"""Every attention backend against one dense fp32 reference: values and q/k/v gradients on packed rows
(several segments and padding), grouped-query heads, a sliding window and a logit soft-cap.

fp32 backends (xla, and the Pallas kernels run in interpret mode on CPU) at the layer tolerance; cuDNN
(bf16 only, marked `gpu`) at one bf16 tolerance against the fp32 reference.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import attention as A

RTOL, ATOL = 1e-5, 1e-5  # fp32, one layer
BF16_RTOL = 2e-2  # bf16 kernels vs the fp32 reference: ||got - want|| / ||want||
B, T, N, K, H = 2, 256, 4, 2, 64  # kernels need T >= 256 in blocks of 128 (splash) / 64 (Pallas GPU)


def packed_segments() -> np.ndarray:
    """Row 0: three documents; row 1: two documents then padding (segment 0), as the packer lays rows out."""
    row0 = np.repeat([1, 2, 3], [100, 60, 96])
    row1 = np.repeat([1, 2, 0], [130, 70, 56])
    return np.stack([row0, row1]).astype(np.int32)


def inputs(seed: int = 0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)
    return q, k, v, jax.random.normal(kd, (B, T, N, H), jnp.float32)


def reference(q, k, v, seg, *, window=None, softcap=None, scale=None):
    """Dense softmax attention in fp32 at HIGHEST precision: same segment, causal by index, in the window."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("btnh,bsnh->bnts", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    i = jnp.arange(q.shape[1])[:, None]
    j = jnp.arange(k.shape[1])[None, :]
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (j <= i)
    if window is not None:
        mask &= (i - j) < window
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v, precision=jax.lax.Precision.HIGHEST)


def value_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


CASES = {  # name: (window, softcap)
    "causal": (None, None),
    "window": (48, None),
    "softcap": (None, 30.0),
    "window_softcap": (48, 5.0),
}


def check(implementation, window, softcap, *, dtype=jnp.float32, packed=True, seg=None, max_segments=0):
    q, k, v, do = inputs()
    seg = jnp.asarray(packed_segments() if seg is None else seg)
    rows = A.Rows(seg, seg)

    def got_fn(q, k, v):
        return A.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), rows, softcap=softcap, window=window,
                           implementation=implementation, packed=packed,
                           max_segments=max_segments).astype(jnp.float32)

    got = value_and_grads(jax.jit(got_fn), q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, seg, window=window, softcap=softcap), q, k, v, do)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        if dtype == jnp.float32:
            np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{implementation} {name}")
        else:
            rel = float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e))
            assert rel <= BF16_RTOL, f"{implementation} {name}: relative error {rel:.3g} > {BF16_RTOL}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", ["xla", "splash", "pallas_gpu"])
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_backend_matches_reference(implementation, case):
    """fp32 on CPU: xla directly, splash and the Pallas GPU kernel in interpret mode (or their xla fallback)."""
    window, softcap = CASES[case]
    check(implementation, window, softcap)


def test_xla_plain_path_off_cpu(monkeypatch):
    """Off CPU the xla backend is the plain einsum path (jax.nn); it gives the same values."""
    monkeypatch.setattr(A, "active_platform", lambda: "gpu")
    check("xla", 48, None)
    check("xla", None, 30.0)


def test_kernel_path_is_taken_without_a_dense_mask():
    """The kernel backends (no window/soft-cap for the Pallas GPU one) never build the [B, 1, T, S] mask."""
    q, k, v, _ = inputs()
    seg = jnp.asarray(packed_segments())
    for implementation, kw in (("splash", dict(window=48, softcap=5.0)), ("pallas_gpu", {})):
        text = str(jax.make_jaxpr(lambda q, k, v: A.attention(q, k, v, A.Rows(seg, seg),
                                                              implementation=implementation, **kw))(q, k, v))
        assert "pallas_call" in text, implementation
        assert f"bool[{B},1,{T},{T}]" not in text, implementation


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_fallback_logs_once(caplog):
    """A feature the backend lacks (a window for the Pallas GPU kernel) goes to xla, logged once."""
    A._said.clear()
    q, k, v, _ = inputs()
    seg = jnp.asarray(packed_segments())
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        for _ in range(2):
            A.attention(q, k, v, A.Rows(seg, seg), window=48, implementation="pallas_gpu")
    lines = [r.getMessage() for r in caplog.records if "sliding window" in r.getMessage()]
    assert lines == ["attention: pallas_gpu does not support a sliding window; using xla for these calls"]


def test_unknown_backend_is_an_error():
    q, k, v, _ = inputs()
    seg = jnp.asarray(packed_segments())
    with pytest.raises(ValueError, match="not one of xla, cudnn, pallas_gpu, splash"):
        A.attention(q, k, v, A.Rows(seg, seg), implementation="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", ["one_a_row", "packed_bounded", "packed_unbounded"])
def test_cudnn_matches_reference(case, rows):
    """cuDNN in bf16 against the fp32 reference: one segment per row (the kernel's own causal/window
    masking), packed rows of at most 4 segments (cuDNN's packed layout) and packed rows without a bound (the
    Pallas GPU flash kernel), or xla where the kernel lacks a feature."""
    window, softcap = CASES[case]
    packed = rows != "one_a_row"
    seg = packed_segments() if packed else np.ones((B, T), np.int32)
    check("cudnn", window, softcap, dtype=jnp.bfloat16, packed=packed, seg=seg,
          max_segments=4 if rows == "packed_bounded" else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas_gpu", "xla"])
def test_gpu_kernels_in_bf16(implementation):
    """The compiled (not interpreted) Pallas GPU kernel and the plain XLA path in bf16 on the GPU."""
    check(implementation, None, None, dtype=jnp.bfloat16)


@pytest.mark.parametrize("implementation", ["splash", "pallas_gpu"])
def test_kernels_run_per_shard_on_a_mesh(implementation):
    """Under an activation mesh (batch over data, kv heads over tensor) the kernels run per device shard
    (shard_map) and still equal the reference, gradients included."""
    from ftjax.sharding import activation_sharding, make_mesh

    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    q, k, v, do = inputs()
    seg = jnp.asarray(packed_segments())

    def got_fn(q, k, v):
        with activation_sharding(mesh):
            return A.attention(q, k, v, A.Rows(seg, seg), implementation=implementation)

    text = str(jax.make_jaxpr(got_fn)(q, k, v))
    assert "shard_map" in text and "pallas_call" in text
    got = value_and_grads(jax.jit(got_fn), q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, seg), q, k, v, do)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{implementation} {name}")
