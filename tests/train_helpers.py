"""Shared pieces of the training tests: a tiny Llama whose dims divide every test mesh, and batches."""

from __future__ import annotations

import numpy as np
from flax import nnx

from ftjax.models.llama import Llama, ModelConfig

# hidden 32 and vocab 96 divide by fsdp=8; heads (32), kv (16) and mlp (64) divide by tensor=2.
TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=128)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> Llama:
    return Llama(cfg, rngs=nnx.Rngs(seed))


def make_batch(rows: int = 8, length: int = 16, seed: int = 0, vocab: int = TINY.vocab_size, packed: bool = True):
    """A global batch in the data pipeline's contract: two packed segments per row and a padded tail."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, length + 1)).astype(np.int32)
    segment_ids = np.ones((rows, length), np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    weights = rng.uniform(0.5, 1.5, (rows, length)).astype(np.float32)  # non-uniform token weights
    if packed:
        cut, pad = length // 2, length - 3
        segment_ids[:, cut:] = 2
        positions[:, cut:] -= cut
        segment_ids[:, pad:] = 0
        weights[:, pad:] = 0.0
        weights[:, cut - 1] = 0.0  # no target across the segment boundary
    return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_weights=weights, segment_ids=segment_ids,
                positions=positions)
