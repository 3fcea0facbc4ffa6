"""LoRA on Llama-3-8B-Instruct, one host of 8 GPUs (H100 80 GB): bf16 compute, bf16 frozen weights, full remat.

Set model.path to a local HF folder (config.json, tokenizer.json, *.safetensors) and data.train to
your JSONL ({"messages": [...]}, {"prompt", "completion"} or {"text"} records):

  python scripts/train.py --config=configs/llama3_8b_lora.py --workdir=runs/llama3_8b \\
      --config.model.path=/path/to/Meta-Llama-3-8B-Instruct --config.data.train=/path/to/train.jsonl

The mesh is FSDP over the host's GPUs (mesh.fsdp=-1: all of them); each GPU holds 1/8 of the
frozen weights and 4 of the 32 packed 4096-token sequences of a step (131k tokens). The
pre-compile estimate is ~21 GiB per GPU (activations ~19 GiB, weights ~2 GiB), so a 40 GB A100
fits too. What it should reach: by the FLOP formula in ftjax/metrics/flops.py a step is ~4.4 PFLOP;
at 40% MFU on 8 H100s that is ~1.4 s/step, ~95k tokens/s (an estimate, not a measurement:
run scripts/benchmark.py with this config to measure). Eval loss on data.eval_fraction of the
data (held out by seed) every 200 steps. On TPU (v5p-8, v6e-8) the same command runs unchanged.
TPU slice: v5p-8 (topology v5p:2x2x1, 4 chips, fsdp over them, 8 rows of 4096 per chip). XLA's TPU compile of
this step (splash attention in Mosaic) holds 31.48 GiB per chip of 95 GiB HBM (pre-compile estimate 31.13 GiB);
compiled from shapes on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/llama3_8b_lora.py --topology=v5p:2x2x1 --out=llama3_8b_lora.json
"""

from ftjax.config import default_config


# Meta-Llama-3-8B-Instruct's config.json (the keys the model reads)
HF_CONFIG = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "tie_word_embeddings": False,
}


def get_config():
    c = default_config()
    c.model.path = "/path/to/Meta-Llama-3-8B-Instruct"
    c.model.dtype = "bfloat16"  # compute; LoRA params and optimizer state stay fp32
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
