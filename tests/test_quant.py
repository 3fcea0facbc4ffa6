"""NF4 (double-quantized) and int8 weights against bitsandbytes' CPU path; the QuantizedWeight container."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError
from ftjax.quant.blockwise8 import dequantize_blockwise8, quantize_blockwise8
from ftjax.quant.codebooks import NF4_CODE, dynamic_map
from ftjax.quant.int8 import dequantize_int8, quantize_int8
from ftjax.quant.nf4 import dequantize_nf4, quantize_nf4
from ftjax.quant.weight import QuantizedParam, QuantizedWeight, quantize_weight
from quant_helpers import run_optimized


@pytest.fixture(scope="module")
def bnb():
    pytest.importorskip("torch")
    return pytest.importorskip("bitsandbytes.functional")


def _bnb_nf4(bnb, w_oi):
    """bitsandbytes' QLoRA storage of a torch weight [out, in]: (packed codes, quant state)."""
    import torch

    return bnb.quantize_4bit(torch.from_numpy(w_oi), blocksize=64, compress_statistics=True, quant_type="nf4")


def _random_weights(seed, dyadic):
    """Random [out, in] weights; `dyadic`: multiples of 2^-12 (any summation order of their absmax is exact)."""
    rng = np.random.default_rng(seed)
    n_out, n_in = int(rng.integers(1, 48)), 64 * int(rng.integers(1, 10))
    w = rng.standard_normal((n_out, n_in)) * rng.choice([1e-3, 0.05, 3.0])
    if dyadic:
        w = np.round(rng.standard_normal((n_out, n_in)) * 300) / 4096
    w = w.astype(np.float32)
    w[0, :64] = 0  # an all-zero block
    return w


def test_codebooks_equal_bitsandbytes(bnb):
    assert np.array_equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(dynamic_map(), bnb.create_dynamic_map().numpy())


@pytest.mark.parametrize("seed", range(6))
def test_blockwise8_equals_bitsandbytes(bnb, seed):
    import torch

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(int(rng.integers(1, 3000))) * rng.uniform(1e-3, 10)).astype(np.float32)
    x[:256] = 0
    codes, absmax = quantize_blockwise8(x, dynamic_map(), 256)
    ref_codes, state = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    assert np.array_equal(codes, ref_codes.numpy())
    assert np.array_equal(absmax, state.absmax.numpy())
    out = run_optimized(lambda q, a: dequantize_blockwise8(q, a, jnp.asarray(dynamic_map()), 256), codes, absmax)
    assert np.array_equal(np.asarray(out), bnb.dequantize_blockwise(ref_codes, state).numpy())


@pytest.mark.parametrize("seed", range(4))
def test_nf4_exactly_bitsandbytes_on_dyadic_blocks(bnb, seed):
    """Where float32 sums are exact, every stored array and the dequantized weight are bitsandbytes' own."""
    w = _random_weights(seed, dyadic=True)
    ref_packed, state = _bnb_nf4(bnb, w)
    blocks = quantize_nf4(w.T)
    assert np.array_equal(blocks.codes.T.reshape(-1), ref_packed.numpy().reshape(-1))
    assert blocks.offset == state.offset.numpy()
    assert np.array_equal(blocks.absmax_codes.T.reshape(-1), state.absmax.numpy())
    assert np.array_equal(blocks.absmax_scales, state.state2.absmax.numpy())
    ref = bnb.dequantize_4bit(ref_packed, state).numpy()
    assert np.array_equal(np.asarray(run_optimized(dequantize_nf4, blocks)).T, ref)


@pytest.mark.parametrize("seed", range(4))
def test_nf4_exactly_bitsandbytes_on_random_blocks(bnb, seed):
    """Gaussian weights: the offset (a float32 mean, whose last bit depends on torch's summation order)
    is within one ulp; given bitsandbytes' offset everything else is bit for bit the same."""
    w = _random_weights(100 + seed, dyadic=False)
    ref_packed, state = _bnb_nf4(bnb, w)
    ref_offset = state.offset.numpy()
    own = quantize_nf4(w.T)
    assert abs(own.offset - ref_offset) <= np.spacing(ref_offset)
    assert np.array_equal(own.codes.T.reshape(-1), ref_packed.numpy().reshape(-1))
    blocks = quantize_nf4(w.T, offset=ref_offset)
    assert np.array_equal(blocks.absmax_codes.T.reshape(-1), state.absmax.numpy())
    assert np.array_equal(blocks.absmax_scales, state.state2.absmax.numpy())
    ref = bnb.dequantize_4bit(ref_packed, state).numpy()
    assert np.array_equal(np.asarray(run_optimized(dequantize_nf4, blocks)).T, ref)


def test_nf4_refuses_partial_blocks():
    with pytest.raises(ConfigError, match="multiple of 64"):
        quantize_nf4(np.ones((96, 4), np.float32))


def test_int8_within_its_rounding_bound():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 40)) * rng.uniform(0.01, 2, size=40)).astype(np.float32)
    w[:, 3] = 0
    ch = quantize_int8(w)
    q, s = ch.codes.astype(np.float64), ch.scales.astype(np.float64)
    assert np.array_equal(ch.scales, (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32))
    assert np.all(np.abs(w - q * s) <= s / 2)  # exact products
    deq = np.asarray(run_optimized(dequantize_int8, ch))
    assert np.array_equal(deq, ch.codes.astype(np.float32) * ch.scales)  # one float32 rounding of q * s
    assert np.all(np.abs(w - deq) <= s / 2 + np.spacing(np.abs(deq)) / 2)
    assert np.abs(ch.codes).max() == 127 and np.all(ch.codes[:, 3] == 0)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_weight_stacked_dequantizes_per_layer_in_jit(scheme):
    """A stacked kernel [L, in, out] equals its layers quantized alone; one scan step sees one layer."""
    rng = np.random.default_rng(1)
    kernel = (rng.standard_normal((3, 128, 24)) * 0.1).astype(np.float32)
    qw = quantize_weight(kernel, scheme, ("layers", "embed", "mlp"))
    per_layer = [quantize_weight(k, scheme, ("embed", "mlp")).dequantize() for k in kernel]
    full = jax.jit(lambda q: q.dequantize())(qw)
    assert full.shape == kernel.shape and full.dtype == jnp.float32
    for i in range(3):
        assert np.array_equal(np.asarray(full[i]), np.asarray(per_layer[i]))

    def step(carry, layer):
        return carry, layer.dequantize()

    _, layers = jax.jit(lambda q: jax.lax.scan(step, 0.0, q))(qw)
    assert np.array_equal(np.asarray(layers), np.asarray(full))
    tol = {"nf4": 0.35, "int8": 0.01}[scheme]  # relative to each block / channel's absmax
    assert np.all(np.abs(np.asarray(full) - kernel) <= tol * np.abs(kernel).max(axis=1, keepdims=True) + 1e-7)


def test_quantized_weight_bytes_and_dtype():
    kernel = np.random.default_rng(2).standard_normal((2, 256, 64)).astype(np.float32)
    nf = quantize_weight(kernel, "nf4", ("layers", "embed", "mlp"), dtype=jnp.bfloat16)
    n = kernel.size
    # 4 bits a weight, 1 byte per 64, 4 bytes per 256 * 64 (rounded up per layer), 4 bytes offset per layer
    assert nf.nbytes == n // 2 + n // 64 + 2 * 4 * -(-(256 * 64 // 64) // 256) + 2 * 4
    assert nf.dequantize().dtype == jnp.bfloat16
    i8 = quantize_weight(kernel, "int8", ("layers", "embed", "mlp"))
    assert i8.nbytes == n + 2 * 64 * 4
    assert nf.nbytes / (2 * n) < 0.3  # against the bf16 kernel


def test_quantized_weight_shards_like_its_kernel():
    from jax.sharding import PartitionSpec as P

    from ftjax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    kernel = np.random.default_rng(3).standard_normal((2, 512, 64)).astype(np.float32)
    qw = quantize_weight(kernel, "nf4", ("layers", "embed", "mlp"))
    specs = qw.shardings(mesh)
    assert specs.arrays["codes"].spec == P(None, "fsdp", "tensor")
    assert specs.arrays["absmax_codes"].spec == P(None, "fsdp", "tensor")
    assert specs.arrays["absmax_scales"].spec == P(None, None)
    placed = jax.device_put(qw, specs)
    assert np.array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(placed)), np.asarray(qw.dequantize()))
    narrow = quantize_weight(kernel[:, :192], "nf4", ("layers", "embed", "mlp"))  # 3 blocks over fsdp=4
    with pytest.raises(ConfigError, match="'embed'.*split its 64-value blocks"):
        narrow.shardings(make_mesh(data=2, fsdp=4, tensor=1))


def test_quantized_param_is_a_frozen_param_leaf():
    from flax import nnx

    qw = quantize_weight(np.ones((64, 8), np.float32), "int8", ("embed", "mlp"))
    var = QuantizedParam(qw)
    assert isinstance(var, nnx.Param)
    leaves = jax.tree.leaves(var)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(np.int8), np.dtype(np.float32)}
    assert isinstance(var.get_value(), QuantizedWeight)


@pytest.mark.slow
def test_smollm2_gguf_blocks_kept_as_shipped_equal_the_dequantized_load(smollm2_gguf_path):
    """Every 2-D tensor of the real SmolLM2 GGUF, held in its own Q4_1 / Q8_0 blocks (q/k rows put back in
    HF order), dequantizes to exactly the float32 tensor ftjax's GGUF reader loads; bytes by the block ratio."""
    import gguf

    from ftjax.interop.gguf import _hf_name, _unpermute, read_gguf, read_gguf_header
    from ftjax.quant.weight import gguf_weight

    header = read_gguf_header(smollm2_gguf_path)
    config, tensors = read_gguf(smollm2_gguf_path)
    buf = np.memmap(smollm2_gguf_path, dtype=np.uint8, mode="r")
    quantized = fp32 = file_bytes = 0
    for name, info in header.tensors.items():
        qtype = gguf.GGMLQuantizationType(info.ggml_type).name
        if len(info.shape) != 2:
            continue
        rows = np.asarray(buf[info.offset:info.offset + info.nbytes]).reshape(info.shape[0], -1)
        if name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            rows = _unpermute(rows, heads)
        qw = gguf_weight(rows, qtype, ("embed", "mlp"))
        assert np.array_equal(np.asarray(run_optimized(lambda q: q.dequantize(), qw)), tensors[_hf_name(name)].T)
        quantized, fp32 = quantized + qw.nbytes, fp32 + 4 * int(np.prod(info.shape))
        file_bytes += gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1] * int(np.prod(info.shape)) // \
            gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    assert quantized == file_bytes  # the blocks' own bytes, nothing added
    assert quantized / fp32 < 0.18  # Q4_1 layers (20 bytes / 32 values) + Q8_0 embeddings (34 / 32): 0.179


@pytest.mark.parametrize("scheme, shape", [("nf4", (3, 192, 40)), ("int8", (2, 64, 24)), ("nf4", (576, 1536))])
def test_abstract_weight_has_the_real_leaves_and_compiles(scheme, shape):
    """Shapes alone give the exact leaves and bytes (memory estimates, compiling a step from abstract shapes)."""
    from ftjax.quant.weight import abstract_weight

    axes = ("layers", "embed", "mlp")[-len(shape):]
    real = quantize_weight(np.ones(shape, np.float32), scheme, axes)
    abstract = abstract_weight(scheme, shape, axes)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [(a.shape, a.dtype) for a in jax.tree.leaves(real)]
    assert abstract.nbytes == real.nbytes
    compiled = jax.jit(lambda q: q.dequantize()).lower(abstract).compile()
    assert compiled.out_info.shape == shape


def test_abstract_gguf_weight_matches_gguf_weight():
    from ftjax.quant.gguf_blocks import BLOCKS
    from ftjax.quant.weight import abstract_weight, gguf_weight

    rows = np.zeros((2, 16, 2 * BLOCKS["Q5_K"][1]), np.uint8)
    real = gguf_weight(rows, "Q5_K", ("layers", "embed", "mlp"))
    abstract = abstract_weight("Q5_K", real.shape, real.axes)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [(a.shape, a.dtype) for a in jax.tree.leaves(real)]
