"""LoRA on Qwen3-8B, one host of 8 GPUs (H100 80 GB) or a TPU v5p-8 / v6e-8: bf16, bf16 frozen weights, full remat.

Set model.path to a local HF folder (config.json, tokenizer.json, *.safetensors) and data.train to
your JSONL ({"messages": [...]}, {"prompt", "completion"} or {"text"} records):

  python scripts/train.py --config=configs/qwen3_8b_lora.py --workdir=runs/qwen3_8b \\
      --config.model.path=/path/to/Qwen3-8B --config.data.train=/path/to/train.jsonl

FSDP over the host's devices, 32 packed 4096-token sequences per step (131k tokens). The
pre-compile estimate is ~22 GiB per device (activations ~20 GiB; with its 152k vocabulary the
untied embedding and output head are 2.5 GB of the 16 GB of bf16 weights). What it should reach:
~4.4 PFLOP per step by the formula in ftjax/metrics/flops.py, so ~1.4 s/step and ~93k tokens/s at 40%
MFU on 8 H100s (an
estimate, not a measurement; scripts/benchmark.py with this config measures it).
TPU slice: v5p-8 (topology v5p:2x2x1, 4 chips, fsdp over them, 8 rows of 4096 per chip). XLA's TPU compile of
this step (splash attention in Mosaic) holds 33.37 GiB per chip of 95 GiB HBM (pre-compile estimate 33.11 GiB);
compiled from shapes on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/qwen3_8b_lora.py --topology=v5p:2x2x1 --out=qwen3_8b_lora.json
"""

from ftjax.config import default_config


# Qwen3-8B's config.json (the keys the model reads)
HF_CONFIG = {
    "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960, "hidden_act": "silu",
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": False,
}


def get_config():
    c = default_config()
    c.model.path = "/path/to/Qwen3-8B"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.method = "lora"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.data.train = "/path/to/train.jsonl"
    c.data.eval_fraction = 0.02
    c.data.seq_len = 4096
    c.train.batch_size = 32
    c.train.steps = 1000
    c.train.log_every = 10
    c.train.frozen_dtype = "bfloat16"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 50
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every = 200
    c.eval.every = 200
    return c
