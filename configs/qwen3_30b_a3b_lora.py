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
Pre-compile memory estimate per device: TBD by lead (the estimate does not yet count the experts). What it
should reach: an estimate by the FLOP formula in ftjax/metrics.py once it counts active experts only; not a
measurement (scripts/benchmark.py with this config measures it).
"""

from pathlib import Path

from ftjax.config import load_recipe


def get_config():
    # Qwen3-8B's recipe: bf16 compute and frozen weights, full remat, LoRA rank 16, 32 x 4096-token rows, lr 2e-4
    c = load_recipe(Path(__file__).with_name("qwen3_8b_lora.py"))
    c.model.path = "/path/to/Qwen3-30B-A3B"
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj"  # the MLPs are experts: ",experts" adds their adapters
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, 4, 1, 2
    return c
