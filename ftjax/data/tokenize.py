"""Records -> token ids and a per-token loss mask, with the model's own tokenizer and chat template.

Which tokens are trained is decided on the rendered text, not on ids: the characters of assistant turn i
are those the template adds after `render(turns[:i], add_generation_prompt=True)` up to the end of
`render(turns[:i+1])` (trailing whitespace excluded). That covers the reply and the template's own
end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`...), so the model learns to stop, and works for
any template that renders a conversation turn by turn. Tokens are then trained where their character
offset falls in such a span. A record marked `"unfinished"` (its final reply was cut short) trains that
reply without its end-of-turn token. A template that renders earlier turns differently once later ones follow
(e.g. Qwen3 dropping reasoning) is refused with a message, unless data.loss_on is last_assistant or all.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from ftjax.data.examples import Examples
from ftjax.data.records import Record
from ftjax.errors import DataError

LOSS_ON = ("assistant", "all", "last_assistant")
_CHUNK = 512  # records tokenized per call to the (Rust) batch tokenizer


def _render(tokenizer: Any, turns: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    msgs = [{"role": r, "content": c} for r, c in turns]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def chat_spans(tokenizer: Any, record: Record, loss_on: str) -> tuple[str, list[tuple[int, int]] | None]:
    """The rendered conversation and the character spans to train on (None: every token)."""
    try:
        full = _render(tokenizer, record.messages, False)
        if loss_on == "all":
            return full, None
        turns = [i for i, (role, _) in enumerate(record.messages) if role == "assistant"]
        if loss_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = _render(tokenizer, record.messages[:i], True)
            upto = full if i == len(record.messages) - 1 else _render(tokenizer, record.messages[:i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(
                    f"{record.source}: the chat template does not render this conversation turn by turn (the text "
                    f"up to assistant turn {i} is not a prefix of the whole), so the assistant tokens cannot be "
                    f"located; use data.loss_on=last_assistant (the final reply only) or data.loss_on=all")
            spans.append((len(before), len(upto.rstrip())))
        if record.unfinished and turns and turns[-1] == len(record.messages) - 1:
            start = spans[-1][0]
            reply = record.messages[-1][1].strip()  # as a trimming template (Llama 3) renders it too
            at = full.find(reply, start)
            if at < 0:
                raise DataError(f"{record.source}: 'unfinished': the chat template does not render the final reply "
                                f"verbatim, so its end-of-turn tokens cannot be told apart")
            spans[-1] = (start, at + len(reply))  # the reply only: its end-of-turn token is not trained
        return full, spans
    except DataError:
        raise
    except Exception as e:  # jinja errors raised by the template itself (raise_exception)
        raise DataError(f"{record.source}: the chat template failed on this record: {e}") from None


def _mask(offsets: np.ndarray, spans: list[tuple[int, int]] | None) -> np.ndarray:
    """Trained tokens: those whose first character lies in one of the (sorted, disjoint) spans."""
    if spans is None:
        return np.ones(len(offsets), bool)
    if not spans or not len(offsets):
        return np.zeros(len(offsets), bool)
    lo = np.array([s for s, _ in spans])
    hi = np.array([e for _, e in spans])
    first = offsets[:, 0]
    k = np.searchsorted(lo, first, side="right") - 1
    return (k >= 0) & (first < hi[np.maximum(k, 0)])


def _digest(record: Record) -> int:
    return int.from_bytes(hashlib.blake2b(record.canonical().encode(), digest_size=8).digest(), "little")


def _plan(tokenizer: Any, record: Record, loss_on: str) -> tuple[str, list | None, bool]:
    """(text to tokenize, trained character spans, whether it is raw text that gets BOS/EOS added)."""
    if record.kind == "text":
        return record.text, None, True
    if getattr(tokenizer, "chat_template", None):
        text, spans = chat_spans(tokenizer, record, loss_on)
        return text, spans, False
    if record.kind == "chat":
        raise DataError(f"{record.source}: a chat record needs a tokenizer with a chat template, and this one has "
                        f"none; use prompt/completion or text records")
    prompt, completion = record.messages[0][1], record.messages[1][1]
    return prompt + completion, None if loss_on == "all" else [(len(prompt), len(prompt) + len(completion))], True


def tokenize_records(records: Sequence[Record], tokenizer: Any, loss_on: str = "assistant") -> Examples:
    """Tokenize and mask every record once (chat records via the template; raw text gets BOS/EOS as the
    tokenizer defines them, with EOS appended and trained)."""
    if loss_on not in LOSS_ON:
        raise DataError(f"data.loss_on={loss_on!r} is not one of {', '.join(LOSS_ON)}")
    if not getattr(tokenizer, "is_fast", True):
        raise DataError("the tokenizer must be a fast (Rust) tokenizer: the loss mask needs character offsets")
    eos = tokenizer.eos_token_id
    encoded = []  # (record index, ids, trained)
    for lo in range(0, len(records), _CHUNK):
        chunk = records[lo:lo + _CHUNK]
        plans = [_plan(tokenizer, r, loss_on) for r in chunk]
        for raw in (False, True):
            which = [k for k, p in enumerate(plans) if p[2] == raw]
            if not which:
                continue
            enc = tokenizer([plans[k][0] for k in which], add_special_tokens=raw, return_offsets_mapping=True)
            for k, tok_ids, offs in zip(which, enc["input_ids"], enc["offset_mapping"]):
                t = np.asarray(tok_ids, np.int32)
                m = _mask(np.asarray(offs, np.int64).reshape(-1, 2), plans[k][1])
                if raw and eos is not None and (not len(t) or t[-1] != eos) and not chunk[k].unfinished:
                    t, m = np.append(t, np.int32(eos)), np.append(m, True)
                encoded.append((lo + k, t, m))
    encoded.sort(key=lambda x: x[0])
    origin, lines, origins = Examples.locate([r.source for r in records])
    lengths = np.array([len(t) for _, t, _ in encoded], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if encoded else lengths
    return Examples(
        ids=np.concatenate([t for _, t, _ in encoded]).astype(np.int32) if encoded else np.zeros(0, np.int32),
        trained=np.concatenate([m for _, _, m in encoded]) if encoded else np.zeros(0, bool),
        starts=starts,
        lengths=lengths,
        digests=np.array([_digest(r) for r in records], np.uint64),
        origin=origin, lines=lines, origins=origins,
    )
