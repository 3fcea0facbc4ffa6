"""What fine-tuning cost: divergence from the base model on general prompts, and general-knowledge accuracy.

Definitions (all token-weighted means pooled over the whole retain set):

- The base model's greedy replies to the retain prompts are generated once (`base_replies`, cached in
  the workdir as `retain_replies.json`). A reply's tokens are the generated ones up to and including the
  first EOS (all `max_new_tokens` of them when none came).
- `kl_to_base` = mean over those reply positions t of KL(p_base(·|x_<t) ‖ p_tuned(·|x_<t)).
- `retain_nll_finetuned` / `retain_nll_base` = mean −log p(x_t | x_<t) of the reply tokens under the
  tuned / base model (the base's is low by construction: they are its own greedy choices).
- `qa_accuracy_base` / `qa_accuracy_finetuned` = fraction of questions with a known `answer` whose greedy
  reply contains it (`scorers.contains_answer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from flax import nnx

from ftjax.data.fingerprint import tokenizer_fingerprint
from ftjax.data.replay import BaseReplies
from ftjax.data.retain import RetainItem, as_messages, item_json
from ftjax.evaluation.base import base_view
from ftjax.evaluation.hosts import everywhere
from ftjax.evaluation.scorers import contains_answer
from ftjax.evaluation.task import generate_replies, generate_rows
from ftjax.evaluation.token_stats import TokenSums, teacher_forced
from ftjax.generate import encode_chat
from ftjax.whole_file import write_whole

CACHE_NAME = "retain_replies.json"
CACHE_VERSION = 2  # 2: rows record "unfinished" (cut by the budget)


def _generate_base(base: nnx.Module, tokenizer: Any, items: Sequence[RetainItem], max_new_tokens: int,
                   batch_size: int, temperature: float = 0.0, seed: int = 0) -> BaseReplies:
    prompt_ids = [encode_chat(tokenizer, as_messages(it.prompt)) for it in items]
    rows, eos = generate_rows(base, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              temperature=temperature, seed=seed)
    reply_ids, unfinished = [], []
    for row in rows:
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        reply_ids.append(row if stop is None else row[:stop + 1])
        unfinished.append(stop is None)
    replies = [tokenizer.decode([t for t in r if t not in eos], skip_special_tokens=True) for r in reply_ids]
    return BaseReplies(list(items), prompt_ids, reply_ids, replies, max_new_tokens, unfinished)


def _identity(tokenizer: Any, items: Sequence[RetainItem], max_new_tokens: int, model_id: str,
              sampling: dict) -> dict:
    return {"version": CACHE_VERSION, "model": model_id, "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_new_tokens": int(max_new_tokens), "prompts": [item_json(it) for it in items], **sampling}


def base_replies(base: nnx.Module, tokenizer: Any, items: Sequence[RetainItem], *, max_new_tokens: int = 64,
                 batch_size: int = 32, cache: str | os.PathLike | None = None, model_id: str = "",
                 write: bool = True, temperature: float = 0.0, samples: int = 1, seed: int = 0) -> BaseReplies:
    """The base model's replies: greedy, or `samples` per prompt drawn at `temperature` (items repeated, in
    order). Read from `cache` when it was made for the same model id, tokenizer, prompts, length and
    sampling (on every process); otherwise generated and (when `write`, i.e. on process 0) cached."""
    if samples < 1 or temperature < 0 or (temperature == 0 and samples > 1):
        raise ValueError(f"base_replies: {samples} samples at temperature {temperature}: greedy gives one reply")
    items = [it for it in items for _ in range(samples)]
    sampling = {"temperature": float(temperature), "samples": int(samples), "seed": int(seed)} if temperature else {}
    ident = _identity(tokenizer, items, max_new_tokens, model_id, sampling)
    path = Path(cache) if cache else None
    saved = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if everywhere(saved.get("identity") == ident):
        rows = saved["replies"]
        return BaseReplies(list(items), [r["prompt_ids"] for r in rows], [r["reply_ids"] for r in rows],
                           [r["reply"] for r in rows], max_new_tokens, [r.get("unfinished", False) for r in rows])
    out = _generate_base(base, tokenizer, items, max_new_tokens, batch_size, temperature, seed)
    if path is not None and write:
        rows = [{"prompt_ids": p, "reply_ids": r, "reply": t, "unfinished": u}
                for p, r, t, u in zip(out.prompt_ids, out.reply_ids, out.replies, out.unfinished)]
        write_whole(path, json.dumps({"identity": ident, "replies": rows}, ensure_ascii=False))
    return out


def qa_accuracy(replies: Sequence[str], answers: Sequence[str]) -> float | None:
    """Fraction of replies containing their answer (None without questions)."""
    if not answers:
        return None
    return float(np.mean([contains_answer(r, a) for r, a in zip(replies, answers)]))


@dataclasses.dataclass
class ForgettingResult:
    metrics: dict[str, float | None]  # kl_to_base, retain_nll_base, retain_nll_finetuned, qa_accuracy_*
    qa_replies: list[str]  # the tuned model's replies to the questions with answers
    sums: TokenSums


def forgetting_metrics(model: nnx.Module, base: nnx.Module | None, tokenizer: Any, replies: BaseReplies, *,
                       qa: bool = True, batch_size: int = 16) -> ForgettingResult:
    """KL(base ‖ tuned) and both NLLs on the base's replies (one pass), and QA accuracy before/after.

    `base=None` means `model` is a LoRA model and its base is itself with the adapters detached (no copy);
    for full fine-tuning pass the base model (its weights at step 0). The tuned model answers the
    questions with the same token budget the base replies had.
    """
    base = base_view(model) if base is None else base
    sums = teacher_forced(model, replies.sequences(), base=base, batch_size=batch_size)
    metrics: dict[str, float | None] = {
        "kl_to_base": TokenSums.mean(sums.kl, sums.tokens),
        "retain_nll_base": TokenSums.mean(sums.base_nll, sums.tokens),
        "retain_nll_finetuned": TokenSums.mean(sums.nll, sums.tokens),
    }
    asked = [i for i, it in enumerate(replies.items) if it.answer]
    answers = [replies.items[i].answer for i in asked]
    metrics["qa_accuracy_base"] = qa_accuracy([replies.replies[i] for i in asked], answers)
    qa_replies: list[str] = []
    if qa and asked:
        qa_replies = generate_replies(model, tokenizer, [replies.items[i].prompt for i in asked],
                                      max_new_tokens=replies.max_new_tokens)
        metrics["qa_accuracy_finetuned"] = qa_accuracy(qa_replies, answers)
    return ForgettingResult(metrics, qa_replies, sums)
