"""QLoRA on Llama-3-70B-Instruct, one 80 GB GPU (A100 / H100 80 GB): NF4 frozen base, bf16 compute, full remat.

  python scripts/train.py --config=configs/llama3_70b_qlora.py --workdir=runs/llama3_70b_qlora \\
      --config.model.path=/path/to/Meta-Llama-3-70B-Instruct --config.data.train=/path/to/train.jsonl

configs/llama3_8b_qlora.py scaled to 70B: the seven projections of all 80 layers in NF4 (36.8 GiB with
the bf16 embedding and head), LoRA rank 16 on every projection (0.77 GiB, Adam 1.54 GiB), micro-batches
of 1 x 2048 tokens with one layer's weights dequantized at a time (activations 8.55 GiB): 47.7 GiB by
the pre-compile estimate, against 137.5 GiB with the bf16 base. Loading reads and quantizes one layer's
tensor at a time on the host (host RAM: the bf16 embedding plus one layer's projections in fp32).
TPU: one v5p chip (topology v5p:1x1x1; on a v5p-8 slice, v5p:2x2x1, add --config.train.grad_accum=2 for the same
1-row micro-batches per chip, data parallel). XLA's TPU compile of this step holds 52.62 GiB of 95 GiB HBM
(pre-compile estimate 49.02 GiB); compiled from shapes on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/llama3_70b_qlora.py --topology=v5p:1x1x1 --out=llama3_70b_qlora.json
"""

from pathlib import Path

from ftjax.config import load_recipe


# Meta-Llama-3-70B-Instruct's config.json (the keys the model reads)
HF_CONFIG = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "tie_word_embeddings": False,
}


def get_config():
    c = load_recipe(Path(__file__).with_name("llama3_8b_qlora.py"))
    c.model.path = "/path/to/Meta-Llama-3-70B-Instruct"
    c.train.steps = 500
    c.optim.lr, c.optim.warmup_steps = 1e-4, 25
    c.checkpoint.every = c.eval.every = 100
    return c
