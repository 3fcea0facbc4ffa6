"""GRPO with LoRA on SmolLM2-135M-Instruct from the base model (no SFT): the demo task (person sentence -> JSON),
rewarded field by field (`json_fields`: the share of name / age / job / city the reply's JSON gets right).

  python scripts/train.py --config=configs/smollm2_135m_grpo.py --workdir=runs/smollm2_grpo

Each step samples 8 completions for each of 4 train prompts with the current weights, scores them on the host and
takes one optimizer step (DAPO's token-level loss, no KL). From the SFT workdir instead of the base:
`--config.model.path=runs/smollm2_lora_demo`. Measured figures: README.md (GRPO section).
"""

from ftjax.config import DEFAULT_MODEL, default_config
from ftjax.tasks import person_json


def get_config():
    c = default_config()
    c.model.path = DEFAULT_MODEL
    c.method = "lora"
    c.objective = "grpo"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.data.train, c.data.eval = person_json.files(n_train=1000, n_eval=50)
    c.data.seq_len = 128  # prompt (~70 tokens with the chat template) + up to 48 new tokens
    c.rl.num_generations = 8
    c.rl.prompts_per_step = 4
    c.rl.max_new_tokens = 48
    c.rl.temperature = 1.0
    c.rl.loss_type = "dapo"
    c.rl.rewards = "json_fields"
    c.train.batch_size = 32  # rows: the 4 x 8 completions, one or more a row
    c.train.grad_accum = 4  # 8 rows a micro-batch: ~1.3 GiB of activations, not 5 (a shared 24 GiB machine)
    c.train.steps = 30
    c.train.log_every = 1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.schedule = "constant"
    c.checkpoint.every = 5
    c.eval.every = 0  # task scores, held-out reward and forgetting once, at the end
    c.eval.max_examples = 50
    c.eval.metric = "person_json"
    c.eval.few_shot = 0  # the base model zero-shot, as the recipe starts from it
    return c
