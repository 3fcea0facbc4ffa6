"""Write the demo task's train/eval JSONL (person sentence -> JSON), reproducibly from a seed."""

import json
import os

from absl import app, flags

from ftjax.tasks import person_json

flags.DEFINE_string("out", "data/person_json", "Folder for train.jsonl and eval.jsonl.")
flags.DEFINE_integer("train", 3000, "Number of training examples.")
flags.DEFINE_integer("eval", 200, "Number of held-out eval examples.")
flags.DEFINE_integer("seed", 0, "Generation seed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    train, evals = person_json.split(FLAGS.train, FLAGS.eval, FLAGS.seed)
    os.makedirs(FLAGS.out, exist_ok=True)
    for name, records in (("train", train), ("eval", evals)):
        path = os.path.join(FLAGS.out, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {len(records)} examples to {path}")


if __name__ == "__main__":
    app.run(main)
