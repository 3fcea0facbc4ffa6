"""Full fine-tuning of SmolLM2-135M-Instruct on CPU: the demo task (person sentence -> JSON), every weight trained.

  python scripts/train.py --config=configs/smollm2_135m_full.py --workdir=runs/smollm2_full
  python scripts/eval.py --workdir=runs/smollm2_full            # before/after table, report.json

Same data and schedule as smollm2_135m_lora.py, with a 20x lower peak learning rate: every weight
moves (embeddings included), so the step must be small. Measured on a 2-core CPU shared with
other jobs: 20 min wall for the 40 steps with two evals; train loss 0.0099 at step 10 and 0.0006
at step 40; eval loss (assistant tokens of the 200 held-out examples) 0.0084 at step 20 and
0.0048 at step 40. A checkpoint (fp32 weights + Adam moments) is ~1.4 GB.
"""

from ftjax.config import DEFAULT_MODEL, default_config
from ftjax.tasks import person_json


def get_config():
    c = default_config()
    c.model.path = DEFAULT_MODEL
    c.method = "full"
    c.data.train, c.data.eval = person_json.files(n_train=3000, n_eval=200)
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 40
    c.train.log_every = 10
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.01
    c.checkpoint.every = 20
    c.checkpoint.keep = 1  # a full checkpoint is ~1.4 GB (fp32 weights + Adam moments)
    c.eval.every = 0  # task scores + forgetting once, at the end (generation is the costly part on CPU)
    c.eval.max_examples = 50
    c.eval.metric = "person_json"
    c.eval.few_shot = 2
    return c
