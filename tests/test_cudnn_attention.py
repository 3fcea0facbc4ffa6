"""The GPU default attention without a GPU: which kernel each row layout goes to, cuDNN's packed layout against
numpy and against what the installed jax does with it, and the default GPU train step lowered for CUDA with
cuDNN's fused-attention custom calls in it (numerics on a GPU: test_attention_backends' `gpu` tests)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import config as config_lib
from ftjax.backend_defaults import backend_defaults
from ftjax.models import attention as A
from ftjax.models import cudnn_packed
from ftjax.models.llama import Llama, ModelConfig, bound_segments
from ftjax.train.compose import compose, row_segments

GPU_ATTENTION = backend_defaults("gpu")["model.attention"]
B, T = 2, 256


def packed_segments() -> np.ndarray:
    """Row 0: three documents; row 1: two documents then padding (segment 0), as the packer lays rows out."""
    return np.stack([np.repeat([1, 2, 3], [100, 60, 96]), np.repeat([1, 2, 0], [130, 70, 56])]).astype(np.int32)


def gpu_config(packing: bool):
    c = config_lib.default_config()
    c.model.path = "tiny-random-llama"
    c.data.packing = packing
    for key, value in backend_defaults("gpu").items():
        group, leaf = key.split(".")
        c[group][leaf] = value
    return c


def test_gpu_default_is_cudnn():
    assert GPU_ATTENTION == "cudnn"


@pytest.mark.parametrize("packing, kernel", [(False, "cudnn"), (True, "cudnn_packed")])
def test_gpu_rows_choose_their_cudnn_kernel(monkeypatch, packing, kernel):
    """With the GPU's default config, a model told its run's rows (data.packing off: one example a row; on: at
    most data.max_segments) sends every layer's attention to the item's cuDNN kernel: recorded at the dispatch,
    traced abstractly (no CUDA runs)."""
    ran = []

    def record(name):
        def kernel_fn(q, *args, **kw):
            ran.append((name, kw.get("slots")))
            return jnp.zeros_like(q)
        return kernel_fn

    monkeypatch.setattr(cudnn_packed, "row_attention", record("cudnn"))
    monkeypatch.setattr(cudnn_packed, "packed_attention", record("cudnn_packed"))
    monkeypatch.setattr(A, "_pallas_gpu", record("pallas_gpu"))
    c = gpu_config(packing)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, dtype=c.model.dtype, param_dtype="float32", attention=c.model.attention)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    bound_segments(model, row_segments(compose(c)))
    seg = jnp.asarray(packed_segments() if packing else np.ones((B, T), np.int32))
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    graphdef, state = nnx.split(model)
    jax.eval_shape(lambda state, ids, seg: nnx.merge(graphdef, state)(ids, None, seg), state, ids, seg)
    slots = c.data.max_segments if packing else None
    assert set(ran) == {(kernel, slots)}
    assert model.config.attention_kernels(T) == A.KERNELS[kernel]


def test_dispatch_of_the_cudnn_backend():
    """bf16 training rows: one a row -> cuDNN, packed with a bound -> cuDNN's packed layout, packed without one ->
    the Pallas kernel with segment ids; fp32 and a soft-cap (cuDNN has neither) -> xla."""
    q = jax.ShapeDtypeStruct((B, T, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, T, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    rows = A.Rows(seg, seg)
    choose = lambda **kw: A.choose_kernel("cudnn", q, k, rows, log=False, **kw)  # noqa: E731
    assert choose(packed=False) == "cudnn"
    assert choose(packed=True, max_segments=1) == "cudnn"
    assert choose(packed=True, max_segments=8) == "cudnn_packed"
    assert choose(packed=True, max_segments=0) == "pallas_gpu"
    assert choose(packed=False, window=48) == "cudnn"
    assert choose(packed=True, max_segments=8, softcap=30.0) == "xla"
    q32 = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    assert A.choose_kernel("cudnn", q32, k, rows, packed=False, log=False) == "xla"


def test_segment_layout_matches_numpy():
    """Lengths [B, slots] and start offsets [B, slots + 1] of each row's segments, -1 where there is none."""
    seg = packed_segments()
    seqlen, offsets = cudnn_packed.segment_layout(jnp.asarray(seg), 4)
    want_len = np.full((B, 4), -1, np.int32)
    want_off = np.full((B, 5), -1, np.int32)
    for b in range(B):
        ids = [s for s in range(1, 5) if (seg[b] == s).any()]
        for m, s in enumerate(ids):
            want_len[b, m] = (seg[b] == s).sum()
            want_off[b, m] = np.flatnonzero(seg[b] == s)[0]
    np.testing.assert_array_equal(seqlen, want_len)
    np.testing.assert_array_equal(offsets, want_off)
    assert seqlen.dtype == offsets.dtype == jnp.int32


def test_jax_turns_the_layout_into_token_ranges():
    """What the installed jax hands cuDNN from our layout (its `_fix_seqlen_offsets`): every segment's global
    token range in the flattened [B·T] rows, and kv offsets strided by the kv heads exactly where
    `repeats_kv_heads` says this jax gets them right."""
    fa = cudnn_packed._fa
    seg = packed_segments()
    n, kh, h = 4, 2, 64
    q = jnp.zeros((B, T, n, h), jnp.bfloat16)
    k = jnp.zeros((B, T, kh, h), jnp.bfloat16)
    seqlen, offsets = cudnn_packed.segment_layout(jnp.asarray(seg), 4)
    q_len, _, q_off, kv_off = (np.asarray(x).ravel() for x in fa._fix_seqlen_offsets(seqlen, seqlen, offsets,
                                                                                       offsets, q, k))
    starts, lengths = [], []
    for b in range(B):
        for s in range(1, 5):
            where = np.flatnonzero(seg[b] == s)
            if where.size:
                starts.append(b * T + where[0])
                lengths.append(where.size)
    count = len(starts)
    np.testing.assert_array_equal(q_len[:count], lengths)
    assert not q_len[count:].any()
    np.testing.assert_array_equal(q_off[:count], np.asarray(starts) * n * h)
    kv_stride = (n if cudnn_packed.repeats_kv_heads(n, kh) else kh) * h
    np.testing.assert_array_equal(kv_off[:count], np.asarray(starts) * kv_stride)


def _cc(capability: str) -> tuple[int, ...]:
    return tuple(int(x) for x in capability.split("."))


def _custom_calls(text: str) -> list[tuple[str, int]]:
    """(target, operand count) of every cuDNN custom call in StableHLO text."""
    calls = re.findall(r"stablehlo\.custom_call @(__cudnn\$\w+)\(([^)]*)\)", text)
    return [(name, len([a for a in args.split(",") if a.strip()])) for name, args in calls]


def _lower_for_cuda(c):
    from ftjax.benchmark import random_batch
    from ftjax.sharding import make_mesh
    from ftjax.train.setup import build_state
    from ftjax.train.step import BATCH_KEYS, make_train_step

    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    setup = build_state(compose(c, devices=jax.devices()[:1]), mesh)
    state = setup.state
    step = make_train_step(state, setup.optimizer, mesh, grad_accum=1, loss_chunk=c.train.loss_chunk,
                           rules=setup.rules)
    host = random_batch(c.train.batch_size, c.data.seq_len, setup.model_config.vocab_size)
    host["segment_ids"] = packed_segments() if c.data.packing else host["segment_ids"]
    batch = {key: jax.ShapeDtypeStruct(host[key].shape, host[key].dtype, sharding=step.batch_sharding)
             for key in BATCH_KEYS}
    frozen, streams = step.arguments(state.trainable, state.frozen, batch)
    traced = step._jitted.trace(state.trainable, state.opt_state, frozen, streams, jax.random.key(0))
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("packing", [False, True])
def test_default_gpu_step_lowers_to_cudnn(monkeypatch, packing):
    """The default GPU config's train step (tiny Llama, bf16, LoRA) lowered for CUDA on this CPU host: cuDNN's
    fused attention forward and backward custom calls, with the segment lengths and offsets as operands for
    packed rows (q, k, v, lengths, lengths, offsets, offsets) and without them one example a row (q, k, v), and
    no Pallas/Triton call. The CUDA lowering rules are jax's own; without CUDA libraries only jax's cuDNN version
    and compute-capability probes are answered here, as a cuDNN 9.10 H100 (compute capability 9.0) would."""
    fa = cudnn_packed._fa
    try:
        fa.check_cudnn_version()
    except RuntimeError as e:  # no CUDA libraries on this host: answer the probes as an H100 with cuDNN 9.10
        monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
        monkeypatch.setattr(fa, "check_compute_capability", lambda capability: _cc(capability) <= (9, 0))
        monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: capability == "9.0")
        probes = f"jax's cuDNN probes answered as an H100 ({e})"
    else:
        probes = "real cuDNN probes"
    c = gpu_config(packing)
    c.data.seq_len, c.train.batch_size = T, B
    try:
        text = _lower_for_cuda(c)
    except Exception as e:  # noqa: BLE001 - say why this jax cannot lower it for CUDA here
        pytest.skip(f"jax {jax.__version__} cannot lower the GPU step for CUDA on this host ({probes}): "
                    f"{type(e).__name__}: {str(e)[:200]}")
    calls = _custom_calls(text)
    operands = 7 if packing else 3
    assert ("__cudnn$fmhaSoftmax", operands) in calls, calls
    assert any(name == "__cudnn$fmhaSoftmaxBackward" for name, _ in calls), calls
    assert {name for name, _ in calls} == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
    assert "triton" not in text.lower() and "pallas" not in text.lower()
