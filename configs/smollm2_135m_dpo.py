"""DPO with LoRA on SmolLM2-135M-Instruct after SFT: the SFT run's adapter, continued on preference pairs.

  bin/demo                                                     # the SFT run: runs/smollm2_lora_demo
  python scripts/train.py --config=configs/smollm2_135m_dpo.py --workdir=runs/smollm2_dpo \
      --config.model.path=runs/smollm2_lora_demo

The pairs (ftjax/tasks/person_json_pairs.py) prefer the SFT task's JSON with its keys in alphabetical order over
the order SFT taught, so the SFT model (this run's base and DPO's reference) gets held-out pairs wrong more often
than not; report.md compares its preference accuracy with the tuned model's (aim: +0.3 and >= 0.9). LoRA settings
and dtypes are those of the SFT recipe (a continued adapter must keep them). Measured on the 2-core CPU
(2026-11-30, benchmarks/RESULTS.md): held-out preference accuracy 0% (SFT model) -> 100% after 30 steps, 603 s with the report.
"""

from ftjax.config import default_config
from ftjax.tasks import person_json_pairs


def get_config():
    c = default_config()
    c.model.path = "runs/smollm2_lora_demo"  # the SFT workdir bin/demo writes (configs/smollm2_135m_lora.py)
    c.method = "lora"
    c.objective = "dpo"
    c.pref.beta = 0.1
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.data.train, c.data.eval = person_json_pairs.files(n_train=1000, n_eval=100)
    c.data.seq_len = 256  # both halves of a pair share a row
    c.train.batch_size = 8
    c.train.steps = 30
    c.train.log_every = 5
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 3
    c.checkpoint.every = 10
    c.eval.every = 0  # preference accuracy and forgetting once, at the end
    c.eval.metric = "exact"
    c.eval.few_shot = 0
    return c
