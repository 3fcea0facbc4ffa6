"""LoRA on SmolLM2-135M-Instruct, the knowledge task: questions about fictional products, the handbook as documents.

  python scripts/train.py --config=configs/smollm2_135m_handbook.py --workdir=runs/smollm2_handbook

The demo recipe's LoRA, optimizer and schedule (configs/smollm2_135m_lora.py) on the generated split of
ftjax/tasks/product_handbook.py (`scripts/make_demo_data.py --task=product_handbook` writes the same files): the
held-out questions ask about products whose facts are only in the handbook (eval.documents), never in the
training questions, so fine-tuning can teach the short answer format but not those facts, while retrieval finds them.
"""

from pathlib import Path

from ftjax.config import load_recipe
from ftjax.tasks import product_handbook


def get_config():
    c = load_recipe(Path(__file__).with_name("smollm2_135m_lora.py"))
    c.data.train, c.data.eval, c.eval.documents = product_handbook.files(n_train=200, n_held_out=50)
    c.eval.max_examples = 36  # 6 held-out products, each of their 6 facts
    c.eval.metric = "contains"  # the fact anywhere in the reply: the base answers in sentences
    c.eval.few_shot = 2  # the fixed prompt's examples; the retrieval rows' passages per question
    return c
