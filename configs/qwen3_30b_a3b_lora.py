"""LoRA on Qwen3-30B-A3B (mixture of experts), one host of 8 GPUs (H100 80 GB): fsdp 4 x expert 2, bf16, full remat.

Set model.path to a local HF folder (config.json, tokenizer.json, *.safetensors; the Hub's per-expert tensors
and transformers 5's fused experts both load) and data.train to your JSONL ({"messages": [...]},
{"prompt", "completion"} or {"text"} records):

  python scripts/train.py --config=configs/qwen3_30b_a3b_lora.py --workdir=runs/qwen3_30b_a3b \\
      --config.model.path=/path/to/Qwen3-30B-A3B --config.data.train=/path/to/train.jsonl

The model: 48 layers, hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of 768 per layer with
top-8 routing, vocabulary 151936: 30.5B parameters, 3.3B active per token. The 128 experts of each layer are
split over the expert axis (2) and their embed dimension over fsdp (4), so each GPU holds 1/8 of the ~29B
expert weights (~7 GB in bf16); tokens split over both axes (8 batch shards of 4 packed 4096-token sequences).
Adapters on attention (q/k/v/o); add the experts' with --config.lora.targets=q_proj,k_proj,v_proj,o_proj,experts
(per-expert rank-16 adapters over gate|up and down: ~630M more trainable parameters). The router stays frozen;
its balance loss is added with the model's own router_aux_loss_coef (moe.router_aux_weight; 0 turns it off).
Pre-compile estimate (ftjax/train/memory.py) per GPU: frozen 7.47 GiB, LoRA 0.03 GiB, Adam 0.06 GiB,
activations 24.91 GiB, total 32.48 GiB (all 128 experts' weights, the routed activations of ragged_dot for
the whole batch's tokens: the routing sorts them all on every device);
reproduce it with
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -c \
      "from ftjax.train.memory import recipe_estimate as e; print(e('configs/qwen3_30b_a3b_lora.py', 8))"
What it should reach: about 17.1 GFLOP a token by the formula in ftjax/metrics/flops.py (router + the 8 routed
experts of 128, not all), 2.2 PFLOP a step, so ~0.7 s/step and ~190k tokens/s at 40% MFU on 8 H100s (an
estimate, not a measurement: scripts/benchmark.py with this config measures it).
TPU slice: v5p-16 (topology v5p:2x2x2, 8 chips as fsdp 4 x expert 2). XLA's TPU compile of this step (splash
attention in Mosaic, ragged_dot experts) holds 31.97 GiB per chip of 95 GiB HBM (pre-compile estimate 34.80 GiB:
the routing sorts the whole batch's tokens, so each chip holds a layer's routed rows for all 32 x 4096 tokens);
compiled from shapes on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/qwen3_30b_a3b_lora.py --topology=v5p:2x2x2 --out=qwen3_30b.json
"""

from pathlib import Path

from ftjax.config import load_recipe

# Qwen3-30B-A3B's config.json (the keys the model reads)
HF_CONFIG = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "max_position_embeddings": 40960, "hidden_act": "silu", "attention_bias": False,
    "tie_word_embeddings": False,
}


def get_config():
    # Qwen3-8B's recipe: bf16 compute and frozen weights, full remat, LoRA rank 16, 32 x 4096-token rows, lr 2e-4
    c = load_recipe(Path(__file__).with_name("qwen3_8b_lora.py"))
    c.model.path = "/path/to/Qwen3-30B-A3B"
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj"  # the MLPs are experts: ",experts" adds their adapters
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, 4, 1, 2
    return c
