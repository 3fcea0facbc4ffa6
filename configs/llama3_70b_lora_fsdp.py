"""LoRA on Llama-3-70B-Instruct over many hosts: FSDP across hosts, tensor parallel within a host, full remat.

Every process runs the same command; model.path, data.train and --workdir must be the same
paths on every host (a shared filesystem: NFS, Filestore, Lustre, or a gcsfuse mount).

TPU pod slice (e.g. v5p-64: 8 hosts x 4 chips; JAX finds the other hosts itself):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command "cd ftjax && \\
      .venv/bin/python scripts/train.py --config=configs/llama3_70b_lora_fsdp.py --workdir=/mnt/shared/runs/70b \\
      --config.model.path=/mnt/shared/Meta-Llama-3-70B-Instruct --config.data.train=/mnt/shared/train.jsonl"

SLURM GPU cluster (e.g. 4 nodes x 8 H100, one process per GPU; JAX reads SLURM_* itself):

  srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 .venv/bin/python scripts/train.py \\
      --config=configs/llama3_70b_lora_fsdp.py --workdir=/shared/runs/70b --config.mesh.tensor=8 \\
      --config.model.path=/shared/Meta-Llama-3-70B-Instruct --config.data.train=/shared/train.jsonl

Elsewhere add --coordinator_address=HOST0:PORT --num_processes=N --process_id=I to each process.

mesh.tensor=4 matches a TPU host's 4 chips (use 8 for 8-GPU hosts, so tensor parallelism stays
on NVLink); mesh.fsdp=-1 takes the rest, across hosts. 32 packed 4096-token sequences per step
(131k tokens). Pre-compile estimates per device: v5p-64 ~32 GiB of 95 (below); 4 x 8 H100 (tensor=8)
~56 GiB of 80; on 2 x 8 H100 add --config.train.grad_accum=4 (~35 GiB). What it should reach:
~38 PFLOP per step by the formula in ftjax/metrics/flops.py; at 40% MFU ~6.5 s/step (~20k tokens/s)
on a v5p-64 and ~3 s/step (~44k tokens/s) on 4 x 8 H100 (estimates, not measurements;
scripts/benchmark.py with this config measures them).
TPU slice: v5p-64 (topology v5p:4x4x2, 32 chips: tensor 4 x fsdp 8). XLA's TPU compile of this step (splash
attention in Mosaic) holds 31.91 GiB per chip of 95 GiB HBM (pre-compile estimate 31.75 GiB); compiled from shapes
on any host (no TPU, no weights) by
  python scripts/compile.py --config=configs/llama3_70b_lora_fsdp.py --topology=v5p:4x4x2 --out=llama3_70b.json
"""

from ftjax.config import default_config


# Meta-Llama-3-70B-Instruct's config.json (the keys the model reads)
HF_CONFIG = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "tie_word_embeddings": False,
}


def get_config():
    c = default_config()
    c.model.path = "/path/to/Meta-Llama-3-70B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.method = "lora"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.data.train = "/path/to/train.jsonl"
    c.data.eval_fraction = 0.01
    c.data.seq_len = 4096
    c.train.batch_size = 32
    c.train.steps = 1000
    c.train.log_every = 10
    c.train.frozen_dtype = "bfloat16"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 50
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 4
    c.checkpoint.every = 100
    c.eval.every = 200
    return c
