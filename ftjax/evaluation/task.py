"""Task evaluation by generation: batched greedy replies to the eval prompts, scored against the references.

Also the teacher-forced loss of the references (`eval_loss`, mean NLL per reference token, the end-of-turn
token included, exactly the tokens the data pipeline trains on with loss_on=last_assistant), so base,
prompted and fine-tuned models are compared on the same tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx

from ftjax import stop
from ftjax.data.records import Record
from ftjax.data.retain import as_messages
from ftjax.data.tokenize import tokenize_records
from ftjax.evaluation.conversations import Turns, as_record, few_shot_turns, split_reply
from ftjax.evaluation.scorers import make_scorer
from ftjax.evaluation.token_stats import TokenSums, even_batches, padded_length, teacher_forced
from ftjax.generate import encode_chat, generate_tokens, pad_id, stop_ids, trim
from ftjax.logs import progress

PROMPT_ALIGN = 16  # generation's prompt padding granule (tokens)


# the report's task figures that are measured wall time: two runs of the same weights differ in them only
TIMED_FIELDS = ("seconds_per_query",)


@dataclasses.dataclass
class TaskResult:
    """Mean scores over the examples, the reference loss, and each example's reply and scores."""

    scores: dict[str, float]
    eval_loss: float | None
    n: int
    replies: list[str]
    per_example: list[dict[str, float]]
    prompts: list[Turns]
    references: list[str]
    loss_n: int | None = None  # examples behind eval_loss: every eval record, as the live eval (n: generated)
    prompt_tokens: float | None = None  # mean tokens of a prompt as the model reads it (chat template included)
    seconds_per_query: float | None = None  # wall time generating the n replies (batched) / n

    def sample(self, i: int = 0) -> dict[str, Any]:
        """One example as the report shows it: the last prompt turn, the reference and the reply."""
        return {"prompt": self.prompts[i][-1][1], "expected": self.references[i], "reply": self.replies[i],
                "scores": self.per_example[i]}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TaskResult":
        prompts = [tuple(tuple(t) for t in p) for p in d["prompts"]]
        return cls(**{**d, "prompts": prompts})


def generate_rows(model: nnx.Module, tokenizer: Any, prompt_ids: Sequence[list[int]], *, max_new_tokens: int,
                  batch_size: int = 32, temperature: float = 0.0, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """New tokens per prompt (EOS and padding included, `max_new_tokens` each) and the stop ids: greedy, or
    sampled at `temperature` (each batch with its own key from `seed`).

    Prompts are sorted by length and split into equal batches (the last padded by repeats), all left-padded
    to the longest prompt's length rounded up to PROMPT_ALIGN, so one compile serves a whole eval and the
    prefill and KV cache carry little padding.
    """
    eos = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batches = even_batches(order, batch_size)
    rows: list[list[int]] = [[] for _ in prompt_ids]
    pad_to = padded_length(max((len(p) for p in prompt_ids), default=1), PROMPT_ALIGN)
    with progress(len(prompt_ids), "prompt", "  generating") as bar:
        for k, idx in enumerate(batches):
            batch = [prompt_ids[i] for i in idx]
            batch += [batch[-1]] * (len(batches[0]) - len(batch))
            tokens = generate_tokens(model, batch, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad,
                                     temperature=temperature, seed=(seed * 100_003 + k) % 2**31, pad_to=pad_to)
            for i, row in zip(idx, tokens):
                rows[i] = [int(t) for t in row]
            bar.update(len(idx))
            stop.safe_point()  # a stop asked for during generation ends it here, on every process alike
    return rows, eos


def generate_replies(model: nnx.Module, tokenizer: Any, prompts: Sequence[Turns], *, max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
    """Greedy replies as text (up to the first EOS) to chat prompts."""
    ids = [encode_chat(tokenizer, as_messages(p)) for p in prompts]
    rows, eos = generate_rows(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(trim(row, eos), skip_special_tokens=True) for row in rows]


def reference_sequences(tokenizer: Any, prompts: Sequence[Turns], references: Sequence[str]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, trained) of each prompt + reference, trained on the reference turn only (as the pipeline does)."""
    records = [Record(f"eval:{i}", "chat", tuple(p) + (("assistant", r),))
               for i, (p, r) in enumerate(zip(prompts, references))]
    ex = tokenize_records(records, tokenizer, loss_on="last_assistant")
    return [ex.tokens(i) for i in range(len(ex))]


def default_max_new_tokens(tokenizer: Any, references: Sequence[str], margin: int = 16) -> int:
    """Longest reference in tokens plus a margin: enough for any exact answer, and bounded cost."""
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    return max(lengths, default=0) + margin


def evaluate_task(model: nnx.Module, tokenizer: Any, records: Sequence[Any], metric: str = "exact", *,
                  max_examples: int = 200, shots: Sequence[Record] = (), batch_size: int = 32,
                  max_new_tokens: int | None = None, with_loss: bool = True, loss_on_all: bool = True,
                  prompt_of: Callable[[int, Turns], Turns] | None = None) -> TaskResult:
    """Score greedy replies to the first `max_examples` eval records by `metric` (see scorers.py); the
    reference loss is over every record, the examples the training loop's eval loss is measured on (with
    `loss_on_all=False`: over the scored examples only, as a quick report measures it).

    `shots` (train records, see `pick_shots`) are prepended as earlier chat turns: the few-shot prompted
    baseline. `prompt_of(i, prompt)` instead gives each eval record's own prompt (i: its index in `records`), e.g.
    its retrieved examples or passages (ftjax.evaluation.retrieval). `max_new_tokens` defaults to the longest
    reference + 16 tokens. The result also holds what a query costs: mean prompt tokens and generation seconds.
    """
    all_recs = [as_record(r, f"eval:{i}") for i, r in enumerate(records)]
    recs = all_recs[:max_examples] if max_examples else all_recs
    all_recs = all_recs if loss_on_all else recs
    if not recs:
        raise ValueError("evaluate_task needs at least one eval record")
    all_pairs = [split_reply(r) for r in all_recs]
    pairs = all_pairs[:len(recs)]
    asked = prompt_of or (lambda i, prompt: few_shot_turns(prompt, shots))
    all_prompts = [asked(i, p) for i, (p, _) in enumerate(all_pairs)]
    prompts = all_prompts[:len(recs)]
    references = [ref for _, ref in pairs]
    budget = max_new_tokens or default_max_new_tokens(tokenizer, references)
    start = time.perf_counter()
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    seconds = (time.perf_counter() - start) / len(prompts)
    prompt_tokens = float(np.mean([len(encode_chat(tokenizer, as_messages(p))) for p in prompts]))
    score = make_scorer(metric)
    per_example = [score(reply, ref) for reply, ref in zip(replies, references)]
    means = {k: float(np.mean([s[k] for s in per_example])) for k in per_example[0]}
    loss = None
    if with_loss:
        sums = teacher_forced(model, reference_sequences(tokenizer, all_prompts, [r for _, r in all_pairs]))
        loss = TokenSums.mean(sums.nll, sums.tokens)
    return TaskResult(means, loss, len(recs), replies, per_example, prompts, references,
                      loss_n=len(all_recs) if with_loss else None, prompt_tokens=prompt_tokens,
                      seconds_per_query=seconds)
