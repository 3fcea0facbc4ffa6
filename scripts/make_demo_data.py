"""Write a bundled task's train/eval JSONL reproducibly from a seed: the demo task (person sentence -> JSON), or
the knowledge task (questions about fictional products, with the handbook as docs.jsonl for eval.documents)."""

import json
import os

from absl import app, flags

from ftjax.tasks import person_json, product_handbook

flags.DEFINE_enum("task", "person_json", ["person_json", "product_handbook"],
                  "person_json: a format to learn; product_handbook: facts of held-out products to look up.")
flags.DEFINE_string("out", "data/person_json", "Folder for train.jsonl and eval.jsonl (and docs.jsonl).")
flags.DEFINE_integer("train", 3000, "Number of training examples (product_handbook: of products, 6 questions each).")
flags.DEFINE_integer("eval", 200, "Number of held-out eval examples (product_handbook: of held-out products).")
flags.DEFINE_integer("seed", 0, "Generation seed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.task == "product_handbook":
        train, evals, docs = product_handbook.split(FLAGS.train, FLAGS.eval, FLAGS.seed)
        files = (("train", train), ("eval", evals), ("docs", docs))
    else:
        files = tuple(zip(("train", "eval"), person_json.split(FLAGS.train, FLAGS.eval, FLAGS.seed)))
    os.makedirs(FLAGS.out, exist_ok=True)
    for name, records in files:
        path = os.path.join(FLAGS.out, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {len(records)} {'documents' if name == 'docs' else 'examples'} to {path}")


if __name__ == "__main__":
    app.run(main)
