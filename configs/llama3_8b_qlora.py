"""QLoRA on Llama-3-8B-Instruct, one 24 GB GPU (RTX 4090 / A10 / L4): configs/llama3_8b_lora.py on an NF4 base.

  python scripts/train.py --config=configs/llama3_8b_qlora.py --workdir=runs/llama3_8b_qlora \\
      --config.model.path=/path/to/Meta-Llama-3-8B-Instruct --config.data.train=/path/to/train.jsonl

The seven projections of every layer are read from the safetensors a layer at a time, quantized to
bitsandbytes' NF4 (double-quantized) on the host and dequantized a layer at a time inside the step;
the embedding and the head stay bf16. Micro-batches of 1 x 2048 tokens (8 accumulated per step). The
pre-compile estimate (ftjax/train/memory.py): frozen 5.31 GiB, LoRA 0.16 GiB, Adam 0.31 GiB,
activations 2.72 GiB (one layer's dequantized weights included): 8.5 GiB, against 16.9 GiB with the
bf16 base. An estimate, not a measurement: scripts/benchmark.py with this config measures the peak.
TPU slice: v5e-1 (topology v5e:1x1, one 16 GiB chip). XLA's TPU compile of this step (NF4 dequantized in the
step, splash attention in Mosaic) holds 9.28 GiB of 16 GiB HBM (pre-compile estimate 9.96 GiB); compiled from
shapes on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/llama3_8b_qlora.py --topology=v5e:1x1 --out=llama3_8b_qlora.json
"""

from pathlib import Path

from ftjax.config import load_recipe


# Meta-Llama-3-8B-Instruct's config.json (the keys the model reads)
HF_CONFIG = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "tie_word_embeddings": False,
}


def get_config():
    c = load_recipe(Path(__file__).with_name("llama3_8b_lora.py"))  # bf16 compute and frozen weights, full remat, LoRA rank 16 on every projection
    c.model.param_dtype = "bfloat16"  # the unquantized frozen weights (embedding, head, norms) as read
    c.train.frozen_quant = "nf4"
    c.mesh.data, c.mesh.fsdp = -1, 1  # one GPU (more: data parallel, each holding the whole NF4 base)
    c.data.seq_len = 2048
    c.train.batch_size, c.train.grad_accum = 8, 8  # micro-batches of 1 x 2048 tokens
    return c
