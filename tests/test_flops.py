"""FLOP accounting (ftjax.metrics.flops) against hand counts and the model's real kernels, and the benchmark's
figures against each other (tokens/s from the step time, MFU from tokens/s, FLOPs and the peak)."""

from __future__ import annotations

import statistics
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.config import load_recipe
from ftjax.lora import apply_lora, linears
from ftjax.metrics import flops as metrics
from ftjax.methods.full import Full
from ftjax.methods.lora import Lora, LoraSpec
from ftjax.metrics.cpu_peak import measured_cpu_peak
from ftjax.metrics.peaks import ACCELERATOR_PEAKS, possible_mfu
from ftjax.models.gemma import GemmaConfig
from ftjax.models.llama import Llama, ModelConfig
from ftjax.models.moe import MoEConfig

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
    assert metrics.full_flops_per_token(CFG, T) == 6 * P + ATTN == 12096


def test_lora_flops_hand_count():
    """Frozen weights: forward + input gradient only (4P); adapters: forward + both gradients (6P)."""
    assert metrics.adapter_flops_per_token(CFG, T, LORA_R2) == 4 * P + 6 * LORA_R2 + ATTN == 11360


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


# The same shapes with a Mixtral MLP: 4 experts of mlp 6, top-2. By hand, per layer: attention 192; router 8*4 = 32;
# the 2 experts a token goes to 2 * 3*8*6 = 288 (the other 2 experts' 288 are not counted): 512; two layers 1024;
# head 800.
MIXTRAL = CFG.replace(model_type="mixtral", moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=6))
P_MIXTRAL = 1824
# Gemma 3's 5:1 pattern on 6 layers (5 sliding over W = 4 keys, the last global), T = 16. Keys per query, the area
# under the mask / T: global T/2 = 8; window W - W^2/2T = 4 - 16/32 = 3.5. Attention fwd+bwd per token
# 12*N*H*sum(keys) = 12*2*4*(5*3.5 + 8) = 96*25.5.
GEMMA3 = CFG.replace(model_type="gemma3_text", num_layers=6, sliding_window=4, sliding_layers=(True,) * 5 + (False,),
                     gemma=GemmaConfig())
ATTN_GEMMA3 = 2448
P_GEMMA3 = 6 * 480 + 800  # 3680: GeGLU has the same three MLP matmuls


def test_mixtral_counts_router_and_top_k_experts_only():
    assert metrics.matmul_params(MIXTRAL) == P_MIXTRAL
    assert metrics.attention_flops_per_token(MIXTRAL, T) == ATTN  # no window: as the dense model
    assert metrics.full_flops_per_token(MIXTRAL, T) == 6 * P_MIXTRAL + ATTN == 12480
    lora_attention = 2 * (32 + 24 + 24 + 32)  # r=2 on q, k, v, o of both layers (the experts frozen)
    assert metrics.adapter_flops_per_token(MIXTRAL, T, lora_attention) == 4 * P_MIXTRAL + 6 * 224 + ATTN == 10176
    more_experts = MIXTRAL.replace(moe=MoEConfig(num_experts=16, top_k=2, intermediate_size=6))
    assert metrics.matmul_params(more_experts) == P_MIXTRAL + 2 * 8 * 12  # only the router grows with E


def test_mixtral_expert_lora_counts_top_k_experts_adapters_only():
    """r=2 on attention and the experts. By hand: attention adapters 224 (as above); each expert's gate|up adapter
    2*(8 + 2*6) = 40 and down adapter 2*(6 + 8) = 28: 68 an expert, 4 experts x 2 layers = 544 held, of which a
    token runs its top-2 experts' in each layer: 2 * 2 * 68 = 272."""
    targets = "q_proj,k_proj,v_proj,o_proj,experts"
    model = nnx.eval_shape(lambda: apply_lora(Llama(MIXTRAL, rngs=nnx.Rngs(0)), 2, 4.0, targets=targets,
                                              rngs=nnx.Rngs(1)))
    _, lora, _ = nnx.split(model, nnx.LoRAParam, ...)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora)) == 224 + 544
    assert metrics.active_lora_params(MIXTRAL, lora) == 224 + 272 == 496
    assert Lora(LoraSpec(2, 4.0, targets)).flops_per_token(MIXTRAL, T, lora) == 4 * P_MIXTRAL + 6 * 496 + ATTN == 11808
    assert Full().flops_per_token(MIXTRAL, T, lora) == 6 * P_MIXTRAL + ATTN  # no adapters
    dense = nnx.eval_shape(lambda: apply_lora(Llama(CFG, rngs=nnx.Rngs(0)), 2, 4.0, rngs=nnx.Rngs(1)))
    assert metrics.active_lora_params(CFG, nnx.split(dense, nnx.LoRAParam, ...)[1]) == LORA_R2  # all of them


def test_moe_matmul_params_match_model_kernels():
    """Attention linears + head + the router + top-k / E of the experts' weights, from the model's own shapes."""
    model = nnx.eval_shape(lambda: Llama(MIXTRAL, rngs=nnx.Rngs(0)))
    kernels = sum(int(np.prod(lin.kernel.get_value().shape)) for _, lin in linears(model))
    experts = sum(int(np.prod(w.get_value().shape)) for w in (model.layers.mlp.experts.gate_proj,
                                                               model.layers.mlp.experts.up_proj,
                                                               model.layers.mlp.experts.down_proj))
    router = int(np.prod(model.layers.mlp.router.get_value().shape))
    head = int(np.prod(model.embed_tokens.get_value().shape))
    assert kernels + router + experts * 2 // 4 + head == metrics.matmul_params(MIXTRAL)


def test_sliding_window_layers_count_their_window_only():
    from ftjax.models.registry import config_from_hf

    hf = dict(model_type="gemma3_text", vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=6,
              num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=4)
    assert config_from_hf(hf).layer_windows() == GEMMA3.layer_windows() == (4,) * 5 + (None,)  # Gemma 3's 5:1
    assert metrics.attention_flops_per_token(GEMMA3, T) == ATTN_GEMMA3
    assert metrics.matmul_params(GEMMA3) == P_GEMMA3
    assert metrics.full_flops_per_token(GEMMA3, T) == 6 * P_GEMMA3 + ATTN_GEMMA3
    mistral = CFG.replace(model_type="mistral", sliding_window=4)  # every layer: 12*2*4 * 2*3.5
    assert metrics.attention_flops_per_token(mistral, T) == 672
    assert metrics.attention_flops_per_token(mistral.replace(sliding_window=T), T) == ATTN  # a window >= T: causal
    assert metrics.attended_keys(T, T - 1) == T / 2 - 1 / (2 * T)  # (T² - 1) / 2T: continuous at W = T


def _tiny_config():
    return load_recipe(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.py")


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_benchmark_figures_are_consistent():
    """scripts/benchmark.py's record on the tiny config: every derived figure follows from the measured ones."""
    from ftjax.benchmark import run_benchmark

    c = _tiny_config()
    c.mesh.data = 1
    said: list[str] = []
    rec = run_benchmark(c, steps=3, warmup=1, devices=jax.devices()[:1], say=said.append)
    assert said[0] == "benchmark: loading the model and compiling the step ..."  # each phase announces itself
    assert said[-1].startswith("benchmark: built in ") and "1 warm-up and 3 timed steps" in said[-1]
    tokens = c.train.batch_size * c.data.seq_len
    assert len(rec["step_times_s"]) == 3 and rec["step_time_s"] == statistics.median(rec["step_times_s"])
    assert rec["tokens_per_s"] == pytest.approx(tokens / rec["step_time_s"], rel=1e-12)
    assert rec["trained_tokens_per_s"] == rec["tokens_per_s"]  # loss on every position
    assert rec["trainable_params"] > 0 and rec["devices"] == 1
    want_fpt = metrics.adapter_flops_per_token(rec_model_cfg(c), c.data.seq_len, rec["trainable_params"])
    assert rec["flops_per_token"] == want_fpt
    ratio = rec["tokens_per_s"] * rec["flops_per_token"] / rec["peak_flops"]
    assert rec["step_flops_per_s"] == pytest.approx(rec["tokens_per_s"] * rec["flops_per_token"], rel=1e-12)
    if ratio <= 1:  # MFU is the ratio when it is possible, else left out with the reason
        assert rec["mfu"] == pytest.approx(ratio, rel=1e-12) and 0 < rec["mfu"] and rec["mfu_note"] is None
    else:
        assert rec["mfu"] is None and rec["mfu_note"].startswith("not measured: the steps ran at")
    assert rec["peak_flops"] == measured_cpu_peak("float32")  # the fastest matmul timed, before or after the steps
    assert "measured float32 matmul" in rec["peak_source"]
    assert rec["peak_memory_bytes"] > 0 and rec["compile_s"] > 0
    assert rec["batch"] == c.train.batch_size and rec["seq_len"] == c.data.seq_len
    assert np.isfinite(rec["final_loss"])
    assert rec["attention_kernel"] == "xla (masked softmax)"  # what the CPU's attention ran, named in the record
    for key in ("platform", "cpu_count", "load_avg"):
        assert key in rec["machine"]


def rec_model_cfg(c):
    from ftjax.api import model_config

    return model_config(c.model.path)


def test_peak_table_names_known_accelerators():
    for chip in ("A100", "H100", "H200", "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"):
        assert chip in ACCELERATOR_PEAKS


def test_an_impossible_mfu_is_left_out_with_its_reason():
    assert possible_mfu(5e9, 10e9) == (0.5, None) and possible_mfu(10e9, 10e9) == (1.0, None)
    mfu, note = possible_mfu(13.43e9, 10e9)  # issue 30's 134.3%: a CPU peak timed under more load than the steps
    assert mfu is None and note.startswith("not measured: the steps ran at 134% of the peak")


def test_the_measured_cpu_peak_only_rises():
    first = measured_cpu_peak("float32", n=256, reps=2)
    again = measured_cpu_peak("float32", n=256, reps=2, again=True)
    assert again >= first and measured_cpu_peak("float32", n=256, reps=2) == again  # kept: the fastest timed
