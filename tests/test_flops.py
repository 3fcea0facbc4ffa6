"""FLOP accounting (ftjax.metrics) against hand counts and the model's real kernels, and the benchmark's
figures against each other (tokens/s from the step time, MFU from tokens/s, FLOPs and the peak)."""

from __future__ import annotations

import statistics
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax import metrics
from ftjax.config import load_recipe
from ftjax.lora import apply_lora, linears
from ftjax.models.llama import Llama, ModelConfig

# 2 layers, d=8, 2 heads x 4 dims, 1 kv head, mlp 12, vocab 100, tied head.
CFG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=4, tie_word_embeddings=True)
T = 16
# By hand: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; mlp 3*8*12 = 288; two layers 960; head 8*100 = 800.
P = 1760
# Causal attention, forward + backward: 3 x (QK^T + AV over T/2 keys on average) = 6*L*N*H*T.
ATTN = 6 * 2 * 2 * 4 * T  # 1536
# LoRA r=2 on all 7 projections: r*(in+out) each: q 2*16, k 2*12, v 2*12, o 2*16, gate/up 2*20, down 2*20.
LORA_R2 = 2 * (32 + 24 + 24 + 32 + 40 + 40 + 40)  # 464


def test_matmul_params_hand_count():
    assert metrics.matmul_params(CFG) == P
    assert metrics.attention_flops_per_token(CFG, T) == ATTN


def test_full_finetuning_flops_hand_count():
    assert metrics.flops_per_token(CFG, T, "full") == 6 * P + ATTN == 12096


def test_lora_flops_hand_count():
    """Frozen weights: forward + input gradient only (4P); adapters: forward + both gradients (6P)."""
    assert metrics.flops_per_token(CFG, T, "lora", LORA_R2) == 4 * P + 6 * LORA_R2 + ATTN == 11360


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_match_model_kernels(tied):
    """Every Linear kernel (stacked over layers) plus the head: the embedding when tied, lm_head if not."""
    cfg = CFG.replace(tie_word_embeddings=tied)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    kernels = sum(int(np.prod(lin.kernel.get_value().shape)) for _, lin in linears(model))
    head = 0 if not tied else int(np.prod(model.embed_tokens.get_value().shape))  # lm_head is among the linears
    assert kernels + head == metrics.matmul_params(cfg)


def test_lora_param_count_matches_adapters():
    model = nnx.eval_shape(lambda: apply_lora(Llama(CFG, rngs=nnx.Rngs(0)), 2, 4.0, rngs=nnx.Rngs(1)))
    _, lora, _ = nnx.split(model, nnx.LoRAParam, ...)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora)) == LORA_R2


def _tiny_config():
    return load_recipe(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.py")


def test_benchmark_figures_are_consistent():
    """scripts/benchmark.py's record on the tiny config: every derived figure follows from the measured ones."""
    from ftjax.benchmark import run_benchmark

    c = _tiny_config()
    c.mesh.data = 1
    rec = run_benchmark(c, steps=3, warmup=1, devices=jax.devices()[:1])
    tokens = c.train.batch_size * c.data.seq_len
    assert len(rec["step_times_s"]) == 3 and rec["step_time_s"] == statistics.median(rec["step_times_s"])
    assert rec["tokens_per_s"] == pytest.approx(tokens / rec["step_time_s"], rel=1e-12)
    assert rec["trained_tokens_per_s"] == rec["tokens_per_s"]  # loss on every position
    assert rec["trainable_params"] > 0 and rec["devices"] == 1
    want_fpt = metrics.flops_per_token(rec_model_cfg(c), c.data.seq_len, "lora", rec["trainable_params"])
    assert rec["flops_per_token"] == want_fpt
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * rec["flops_per_token"] / rec["peak_flops"], rel=1e-12)
    assert 0 < rec["mfu"] < 1.5  # a measured peak can be beaten a little by a lucky step, never by much
    assert "measured float32 matmul" in rec["peak_source"]
    assert rec["peak_memory_bytes"] > 0 and rec["compile_s"] > 0
    assert rec["batch"] == c.train.batch_size and rec["seq_len"] == c.data.seq_len
    assert np.isfinite(rec["final_loss"])
    for key in ("platform", "cpu_count", "load_avg"):
        assert key in rec["machine"]


def rec_model_cfg(c):
    from ftjax.api import model_config

    return model_config(c.model.path)


def test_peak_table_names_known_accelerators():
    for chip in ("A100", "H100", "H200", "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"):
        assert chip in metrics.ACCELERATOR_PEAKS
