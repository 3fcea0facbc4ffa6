"""GGUF block types dequantized in jnp (inside jit) equal `gguf.quants.dequantize` exactly."""

import numpy as np
import pytest

from ftjax.quant.gguf_blocks import BLOCKS, dequantize_blocks
from quant_helpers import run_optimized

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

# byte offsets of each type's f16 scales within a block
_F16_AT = {"F32": (), "F16": (0,), "BF16": (), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
           "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(qtype: str, n_rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes whose f16 scale fields hold finite values (normal and subnormal, both signs)."""
    rng = np.random.default_rng(seed)
    size = BLOCKS[qtype][1]
    if qtype in ("F32", "BF16"):  # finite values, both signs, many exponents
        values = rng.standard_normal((n_rows, n_blocks)) * 10.0 ** rng.integers(-30, 30, (n_rows, n_blocks))
        return values.astype(np.float32).view(np.uint8).reshape(n_rows, n_blocks, 4)[..., 4 - size:]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks, size), dtype=np.uint8)
    scales = (rng.standard_normal((n_rows, n_blocks, len(_F16_AT[qtype]))) *
              rng.choice([1e-6, 1e-3, 1.0, 300.0], size=(n_rows, n_blocks, 1))).astype(np.float16)
    for i, at in enumerate(_F16_AT[qtype]):
        raw[..., at:at + 2] = scales[..., i:i + 1].view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_block_dequantize_equals_gguf(qtype):
    raw = _random_blocks(qtype, n_rows=6, n_blocks=5, seed=len(qtype) + ord(qtype[1]))
    ggml_type = gguf.GGMLQuantizationType[qtype]
    ref = dequantize(raw.reshape(6, -1), ggml_type)  # the file's rows, as gguf reads them
    out = np.asarray(run_optimized(lambda b: dequantize_blocks(b, qtype), raw))
    assert out.shape == ref.shape == (6, 5 * BLOCKS[qtype][0])
    assert np.isfinite(ref).all()
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K"])
def test_gguf_weight_keeps_the_file_blocks_and_dequantizes_per_layer(qtype):
    """Stacked rows [L, out, bytes] -> kernel [L, in, out] equal to gguf's dequantize, layer by layer."""
    from jax.sharding import PartitionSpec as P

    from ftjax.quant.weight import gguf_weight
    from ftjax.sharding import make_mesh

    block, size = BLOCKS[qtype]
    rows = _random_blocks(qtype, n_rows=2 * 16, n_blocks=2, seed=7).reshape(2, 16, 2 * size)
    qw = gguf_weight(rows, qtype, ("layers", "embed", "mlp"))
    assert qw.shape == (2, 2 * block, 16) and qw.nbytes == rows.nbytes
    kernel = np.asarray(run_optimized(lambda q: q.dequantize(), qw))
    for layer in range(2):
        ref = dequantize(rows[layer], gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(kernel[layer], ref.T)
    specs = qw.shardings(make_mesh(data=1, fsdp=2, tensor=4))
    assert specs.arrays["codes"].spec == P(None, "tensor", "fsdp", None)
