"""What only the teacher sees before each prompt (distill.teacher_prefix): the report's fixed k-shot examples, the k
most similar other train examples (BM25), a system prompt, or nothing (a teacher of its own needs none)."""

from __future__ import annotations

from typing import Any, Sequence

from ftjax.data.mixture import parse_sources
from ftjax.data.records import Record
from ftjax.errors import ConfigError, DataError
from ftjax.evaluation.conversations import Turns, few_shot_turns, load_records, pick_shots, split_reply
from ftjax.evaluation.retrieval import bm25_top_k, query_text


def with_system(prompt: Turns, text: str) -> Turns:
    """The prompt with `text` as its system message (before the prompt's own system message, if it has one)."""
    if prompt and prompt[0][0] == "system":
        return (("system", f"{text}\n\n{prompt[0][1]}"),) + tuple(prompt[1:])
    return (("system", text),) + tuple(prompt)


class TeacherPrefix:
    """`teacher_records(records)`: each record as the teacher sees it (its prompt after the prefix, the same
    reply). kshot draws the shots exactly as the report's prompted baseline does (`pick_shots` of the first train
    file, eval.few_shot of them, config.seed), so the teacher is that baseline."""

    def __init__(self, spec: str, train: str | None, k: int, seed: int, fields: Any):
        """`train`: data.train (the first file gives the examples), `k`: eval.few_shot, `seed`: the run's."""
        self.spec = str(spec)
        self.k, self.shots, self.pool = int(k), [], []
        if self.spec in ("kshot", "retrieval"):
            if not train:
                raise ConfigError(f"distill.teacher_prefix={self.spec} draws its examples from data.train, which is "
                                  "not set")
            pool = load_records(parse_sources(train)[0].path, fields)
            if self.spec == "kshot":
                self.shots = pick_shots(pool, self.k, seed=int(seed))
            else:
                if len(pool) <= self.k:
                    raise DataError(f"distill.teacher_prefix=retrieval needs more than eval.few_shot={self.k} "
                                    f"train records, got {len(pool)}")
                self.pool = pool

    def identity(self) -> list:
        """What the teacher's prompts depend on beyond the records (a token-cache key part)."""
        return [self.spec, self.k, [s.canonical() for s in self.shots], len(self.pool)]

    def teacher_records(self, records: Sequence[Record]) -> list[Record]:
        prompts = [split_reply(r) for r in records]
        if self.spec == "kshot":
            turns = [few_shot_turns(p, self.shots) for p, _ in prompts]
        elif self.spec == "retrieval":
            turns = self._retrieved([p for p, _ in prompts], [r.canonical() for r in records])
        elif self.spec.startswith("system:"):
            turns = [with_system(p, self.spec[len("system:"):].strip()) for p, _ in prompts]
        else:
            turns = [p for p, _ in prompts]
        return [Record(r.source, "chat", tuple(t) + (("assistant", reply),))
                for r, t, (_, reply) in zip(records, turns, prompts)]

    def _retrieved(self, prompts: Sequence[Turns], canonical: Sequence[str]) -> list[Turns]:
        """Each prompt after the k most similar train examples by BM25 over the prompt text, never itself, the most
        similar last (nearest the question), as the report's retrieval baseline lays them out."""
        corpus = [query_text(split_reply(r)[0]) for r in self.pool]
        pool_text = [r.canonical() for r in self.pool]
        found = bm25_top_k(corpus, [query_text(p) for p in prompts], self.k + 1)
        out = []
        for p, own, ranked in zip(prompts, canonical, found):
            shots = [self.pool[i] for i in ranked if pool_text[i] != own][:self.k]
            out.append(few_shot_turns(p, shots[::-1]))
        return out
