"""A preference task on the demo task's sentences: the same JSON, keys in alphabetical order (chosen) over the
demo task's fixed order (rejected).

A house style the SFT data never showed (say, a downstream parser that diffs sorted JSON): a model tuned on
`person_json` prefers its own key order, so it gets these pairs wrong; DPO on the pairs flips that preference
without teaching new facts. TRL's standard preference format; reproducible from a seed, train and eval disjoint.
"""

from __future__ import annotations

import json

from ftjax.tasks import person_json


def pair(record: dict) -> dict:
    """{"prompt", "chosen", "rejected"} from a person_json chat record."""
    user, assistant = record["messages"]
    person = json.loads(assistant["content"])
    return {"prompt": user["content"], "chosen": json.dumps(dict(sorted(person.items()))),
            "rejected": assistant["content"]}


def files(n_train: int = 1000, n_eval: int = 100, seed: int = 1) -> tuple[str, str]:
    """(train.jsonl, eval.jsonl) paths of the generated pairs, written once (atomically) into $FTJAX_CACHE
    (default ~/.cache/ftjax)."""
    def make():
        return [[pair(r) for r in part] for part in person_json.split(n_train, n_eval, seed)]

    return person_json.cached_splits(f"person_json_pairs-{n_train}-{n_eval}-{seed}", make)
