"""Context distillation on SmolLM2-135M-Instruct: the demo task's 2-shot prompted base model (the teacher: the
report's fixed 2 examples before each prompt) distilled into a LoRA student that sees no examples.

  python scripts/train.py --config=configs/smollm2_135m_context_distill.py --workdir=runs/smollm2_context_distill

The teacher is the student's own base with its adapters off (no second copy of the weights), run in the same step
on the 2-shot prompt; the student learns its next-token distribution (forward KL) on the train replies, prompted
with the question alone. The report's task table compares the student (fine-tuned, 0-shot) with the teacher (base,
2-shot: 54% exact in the demo's report) and the distill row gives the prompt tokens per query of each. Target: the
student reaches at least 90% of the teacher's exact match at 0-shot, at a third of its prompt tokens. Measured
(2026-12-07, 2-core CPU at load ~20): 52.0% exact (teacher 54.0%: 96%) at 70.4 prompt tokens per query (teacher
243.4); training 54 min, the report 22 min.
"""

from pathlib import Path

from ftjax.config import load_recipe


def get_config():
    c = load_recipe(Path(__file__).with_name("smollm2_135m_lora.py"))  # its model, LoRA, data, schedule, eval
    c.objective = "distill"
    c.distill.teacher = "self"
    c.distill.teacher_prefix = "kshot"  # eval.few_shot (2) examples, drawn as the report's prompted baseline draws them
    c.distill.loss = "forward_kl"
    c.data.seq_len = 128  # the student's rows (its longest example: 114 tokens); the teacher's fit its longest (287)
    c.data.packing = False  # one example a row on both sides
    c.train.loss_chunk = 64  # two heads' logits (student and teacher) per chunk: [8, 64, 49152] fp32 each
    c.train.log_every = 5
    c.checkpoint.every = 10
    return c
