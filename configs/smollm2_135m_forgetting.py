"""The README forgetting experiment: SmolLM2-135M-Instruct fully fine-tuned on the demo task (person sentence
-> JSON) at a high learning rate, so that it drifts from its base; then the same run with each control.

  python scripts/train.py --config=configs/smollm2_135m_forgetting.py --workdir=runs/forget_none
  python scripts/train.py --config=configs/smollm2_135m_forgetting.py --workdir=runs/forget_replay \\
      --config.forget.replay_fraction=0.5 --config.train.batch_size=16
  python scripts/train.py --config=configs/smollm2_135m_forgetting.py --workdir=runs/forget_kl \\
      --config.forget.kl_weight=1.0

Each run writes WORKDIR/report.json: compare `forgetting.kl_to_base` (the aim: at least halved by each
control) at `task.finetuned.person_json` within 5 points. Same seed and the same 8 task rows per step in all
three: the KL term adds its own batch of 8 retain rows, replay at 0.5 of a batch of 16 adds 8 replayed rows.
The controls train on the base's replies to the 50 bundled control prompts (replay: 4 samples each at
temperature 1; KL: the greedy reply's full distributions); forgetting is measured on the 60 bundled retain
prompts, which no run trains on (out of sample). `forget.l2_weight` (Σ‖W − W_base‖²) is the third knob
for full fine-tuning.

Measured on the 2-core CPU (README "Forgetting"; history in benchmarks/RESULTS.md): no control 100% exact, KL 2.70 (re-run 2026-11-30: the
2.47 first written did not reproduce); replay 96%, KL 0.94 (0.35x); kl_weight 1.0 94%, KL 0.63 (0.23x)
(both re-run 2026-11-30 at 9ea0ffd, within 1.2% of the first figures).
8-10 min per plain run, 15-20 min with a control (its step is about twice the work), plus 4 min once for
replay's samples.
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
    c.train.log_every = 5
    c.optim.lr = 1e-3  # 10x smollm2_135m_full.py: high enough that the plain run forgets
    c.optim.warmup_steps = 5
    c.optim.schedule = "cosine"
    c.checkpoint.every = 0  # only the final checkpoint (~1.4 GB: fp32 weights + Adam moments)
    c.checkpoint.keep = 1
    c.eval.every = 0  # task scores and forgetting once, at the end (eval.final)
    c.eval.final = True
    c.eval.max_examples = 50
    c.eval.metric = "person_json"
    c.eval.few_shot = 2
    c.forget.replay_fraction = 0.0  # 0.5 with train.batch_size=16: 8 replayed rows beside the 8 task rows
    c.forget.kl_weight = 0.0  # --config.forget.kl_weight=1.0: KL(base ‖ tuned) on the base's own replies
    return c
