"""LoRA on Gemma-3-4B (the language model of the multimodal gemma-3-4b-it folder), one GPU (H100 80 GB).

Set model.path to the local HF folder (Gemma3ForConditionalGeneration: the text weights load, the vision tower
is left out; a Gemma3ForCausalLM text-only folder loads the same) and data.train to your JSONL
({"messages": [...]}, {"prompt", "completion"} or {"text"} records):

  python scripts/train.py --config=configs/gemma3_4b_lora.py --workdir=runs/gemma3_4b \\
      --config.model.path=/path/to/gemma-3-4b-it --config.data.train=/path/to/train.jsonl

Shape (HF_CONFIG below): 34 layers, hidden 2560, GeGLU 10240, 8 query / 4 kv heads of 256, 262k vocabulary
(tied), 5 sliding-window layers (1024 tokens) to each global one. bf16 compute and frozen weights, full remat,
LoRA r=16 on all seven projections (29.8M params over a 3.88B base); 16 packed 4096-token sequences a step.
Pre-compile estimate (ftjax/train/memory.py) on one GPU: frozen 7.23 GiB, LoRA 0.11 GiB, Adam 0.22 GiB,
activations 21.94 GiB, total 29.50 GiB (a 40 GB A100 fits too); reproduce it with
  python -c "from ftjax.train.memory import recipe_estimate as e; print(e('configs/gemma3_4b_lora.py', 1))"
What it should reach: 16.6 GFLOP a token by the formula in ftjax/metrics/flops.py (the local layers attend over
their window only), 1.09 PFLOP a step, so ~2.7 s/step and ~24k tokens/s at 40% MFU on one H100 (an estimate,
not a measurement: scripts/benchmark.py with this config measures it).
TPU: one v5p chip (topology v5p:1x1x1; 16 rows of 4096 on it). XLA's TPU compile of this step (splash attention
in Mosaic, local masks on the sliding layers) holds 44.40 GiB of 95 GiB HBM (pre-compile estimate 39.41 GiB);
compiled from shapes on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/gemma3_4b_lora.py --topology=v5p:1x1x1 --out=gemma3_4b_lora.json
"""

from pathlib import Path

from ftjax.config import load_recipe

# text_config of gemma-3-4b-it's config.json, with the Gemma3TextConfig defaults it leaves out written in
HF_CONFIG = {
    "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
    "sliding_window": 1024, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
}


def get_config():
    # bf16 compute and frozen weights, full remat, LoRA rank 16 on every projection, as for Llama-3-8B
    c = load_recipe(Path(__file__).with_name("llama3_8b_lora.py"))
    c.model.path = "/path/to/gemma-3-4b-it"
    c.train.batch_size = 16  # one GPU: mesh.fsdp=-1 is the one device
    c.train.loss_chunk = 128  # 16 rows x 128 tokens x 262k vocabulary of fp32 logits: 2 GiB at a time
    return c
