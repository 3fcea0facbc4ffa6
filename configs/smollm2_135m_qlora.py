"""QLoRA on SmolLM2-135M-Instruct: the demo recipe (configs/smollm2_135m_lora.py) on an NF4 frozen base.

  python scripts/train.py --config=configs/smollm2_135m_qlora.py --workdir=runs/smollm2_qlora

The same task, data, steps and learning rate as the LoRA recipe; the frozen linears (every LoRA target:
all seven projections of each layer) are held in bitsandbytes' NF4 with double quantization and
dequantized a layer at a time inside the step, so report.json's "base" is that NF4 model. Compare its
`task.finetuned.exact` and forgetting figures with the LoRA run's (the goal: within 4 points of its exact
match). `--config.train.frozen_quant=gguf` trains on the shipped file's own Q4_1 blocks instead, which
computes exactly what the LoRA recipe's dequantized base does, at ~0.16x the frozen linears' bytes.
"""

from pathlib import Path

from ftjax.config import load_recipe


def get_config():
    c = load_recipe(Path(__file__).with_name("smollm2_135m_lora.py"))
    c.train.frozen_quant = "nf4"
    return c
