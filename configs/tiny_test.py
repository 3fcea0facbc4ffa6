"""A tiny random Llama-shaped model on generated demo data: seconds per run on a CPU.

  python scripts/train.py --config=configs/tiny_test.py --workdir=/tmp/tiny

For tests and smoke runs: logs every step, evaluates, checkpoints. It should reach a train
loss clearly below its first step's within its 8 steps (the data is highly regular).
"""

from ftjax.config import default_config
from ftjax.tasks import person_json


def get_config():
    c = default_config()
    c.model.path = "tiny-random-llama"
    c.method = "lora"
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.data.train, c.data.eval = person_json.files(n_train=64, n_eval=16)
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 8
    c.train.log_every = 1
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 1
    c.checkpoint.every = 4
    c.eval.every = 0  # eval loss, task scores and forgetting at the end (eval.final)
    c.eval.max_examples = 8
    c.eval.metric = "person_json"
    c.eval.few_shot = 1
    c.forget.max_new_tokens = 8
    return c
