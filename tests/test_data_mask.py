"""The loss mask covers exactly the assistant tokens (reply + end-of-turn token) of multi-turn chats.

The expected mask is derived independently of ftjax.data: the ids come from transformers'
`apply_chat_template(tokenize=True)`, and each assistant reply is located as its own token sequence
(searched in order), followed by the template's end-of-turn token.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from data_helpers import chat, data_part, llama3_style_tokenizer, smollm2_tokenizer, write_jsonl
from ftjax.data import build_datasets
from ftjax.errors import DataError

# tokenizer, end-of-turn token, whether the template trims the reply's whitespace
TEMPLATES = {"smollm2": (smollm2_tokenizer, "<|im_end|>", False), "llama3": (llama3_style_tokenizer, "<|eot_id|>", True)}


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for k in range(start, len(seq) - len(sub) + 1):
        if seq[k:k + len(sub)] == sub:
            return k
    raise AssertionError(f"{sub} not found after {start}")


def expected(tok, messages: list[dict], end_of_turn: str, loss_on: str, trim: bool = False
             ) -> tuple[list[int], np.ndarray]:
    """(ids, per-token trained mask) built from the template's output and each reply's own tokens."""
    ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    mask = np.zeros(len(ids), bool)
    if loss_on == "all":
        return ids, ~mask
    eot = tok.convert_tokens_to_ids(end_of_turn)
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        reply = tok(m["content"].strip() if trim else m["content"], add_special_tokens=False)["input_ids"]
        k = _find(ids, reply, pos)
        assert ids[k + len(reply)] == eot  # the reply is followed by the end-of-turn token
        spans.append((k, k + len(reply) + 1))
        pos = k + len(reply) + 1
    for lo, hi in spans[-1:] if loss_on == "last_assistant" else spans:
        mask[lo:hi] = True
    return ids, mask


def _records():
    recs = [chat(i, turns=1 + i % 3, system=i % 2 == 0) for i in range(6)]
    recs[1]["messages"][1]["content"] = "Reply with trailing spaces.  "  # Llama-3 trims them; SmolLM2 keeps them
    return recs


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "all"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_mask_covers_exactly_assistant_tokens(tmp_path, template, loss_on):
    make_tok, eot, trim = TEMPLATES[template]
    tok = make_tok()
    recs = _records()
    path = write_jsonl(tmp_path / "chats.jsonl", recs)
    data = build_datasets(data_part(path, seq_len=256, packing=False, loss_on=loss_on), tok,
                          vocab_size=len(tok))
    rows = data.train
    assert len(rows) == len(recs)
    seen = set()
    for r in range(len(rows)):
        (e,) = rows.row_items(r)
        line = int(rows.examples.lines[e])
        seen.add(line)
        ids, mask = expected(tok, recs[line - 1]["messages"], eot, loss_on, trim)
        b = rows.batch([r])
        n = len(ids) - 1
        np.testing.assert_array_equal(b["input_ids"][0, :n], ids[:-1])
        np.testing.assert_array_equal(b["targets"][0, :n], ids[1:])
        np.testing.assert_array_equal(b["loss_weights"][0, :n], mask[1:].astype(np.float32))
        assert not b["loss_weights"][0, n:].any() and not b["segment_ids"][0, n:].any()
    assert seen == set(range(1, len(recs) + 1))


def test_prompt_completion_and_text_masks(tmp_path):
    tok = smollm2_tokenizer()
    recs = [{"prompt": "Name a colour.", "completion": "Green."}, {"text": "Plain text for pre-training."}]
    path = write_jsonl(tmp_path / "mixed.jsonl", recs)
    rows = build_datasets(data_part(path, seq_len=128, packing=False), tok).train
    by_line = {int(rows.examples.lines[rows.row_items(r)[0]]): rows.batch([r])
               for r in range(len(rows))}
    # prompt/completion is rendered as a user/assistant chat: only the completion + <|im_end|> are trained
    msgs = [{"role": "user", "content": recs[0]["prompt"]}, {"role": "assistant", "content": recs[0]["completion"]}]
    ids, mask = expected(tok, msgs, "<|im_end|>", "assistant")
    np.testing.assert_array_equal(by_line[1]["loss_weights"][0, :len(ids) - 1], mask[1:])
    # text: the tokenizer's ids plus EOS, every target trained
    text_ids = tok(recs[1]["text"])["input_ids"] + [tok.eos_token_id]
    b = by_line[2]
    np.testing.assert_array_equal(b["input_ids"][0, :len(text_ids) - 1], text_ids[:-1])
    np.testing.assert_array_equal(b["targets"][0, :len(text_ids) - 1], text_ids[1:])
    assert b["loss_weights"][0].sum() == len(text_ids) - 1


def test_template_that_rewrites_earlier_turns_is_refused_with_a_way_out(tmp_path):
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "{% if loop.last and m['role'] == 'assistant' %} [final]{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write_jsonl(tmp_path / "chats.jsonl", [chat(0, turns=1), chat(1, turns=2)])
    with pytest.raises(DataError, match=rf"^{path}:2: the chat template does not render this conversation turn by "
                                        rf"turn.*data.loss_on=last_assistant"):
        build_datasets(data_part(path, seq_len=256), tok)
    rows = build_datasets(data_part(path, seq_len=256, packing=False, loss_on="last_assistant"), tok).train
    for r in range(len(rows)):
        (e,) = rows.row_items(r)
        b = rows.batch([r])
        trained = b["targets"][0][b["loss_weights"][0] > 0]
        reply = chat(int(rows.examples.lines[e]) - 1, turns=int(rows.examples.lines[e]))["messages"][-1]["content"]
        assert tok.decode(trained) == f"{reply} [final]<|im_end|>"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_unfinished_reply_trains_no_end_of_turn(tmp_path, template):
    """`"unfinished": true` (a reply a token budget cut): the same ids, the same mask minus the final
    end-of-turn token; earlier turns keep theirs."""
    make_tok, eot, trim = TEMPLATES[template]
    tok = make_tok()
    rec = chat(3, turns=2, system=True)
    if trim:  # the template renders the reply trimmed: the span must still end where the reply does
        rec["messages"][-1]["content"] = "  " + rec["messages"][-1]["content"] + " "
    path = write_jsonl(tmp_path / "chats.jsonl", [rec, {**rec, "unfinished": True}])
    rows = build_datasets(data_part(path, seq_len=256, packing=False), tok, vocab_size=len(tok)).train
    ids, mask = expected(tok, rec["messages"], eot, "assistant", trim)
    last_eot = max(k for k, t in enumerate(ids) if t == tok.convert_tokens_to_ids(eot) and mask[k])
    mask[last_eot] = False
    by_line = {int(rows.examples.lines[rows.row_items(r)[0]]): rows.batch([r]) for r in range(len(rows))}
    n = len(ids) - 1
    np.testing.assert_array_equal(by_line[2]["input_ids"][0, :n], ids[:-1])
    np.testing.assert_array_equal(by_line[2]["loss_weights"][0, :n], mask[1:].astype(np.float32))
    assert by_line[1]["loss_weights"][0].sum() == by_line[2]["loss_weights"][0].sum() + 1


def test_unfinished_completion_without_template_gets_no_eos(tmp_path):
    """Raw prompt/completion (no chat template): EOS is appended and trained, unless the reply is unfinished."""
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = None
    rec = {"prompt": "Count:", "completion": " one two three four"}
    path = write_jsonl(tmp_path / "raw.jsonl", [rec, {**rec, "unfinished": True}])
    rows = build_datasets(data_part(path, seq_len=64, packing=False), tok).train
    by_line = {int(rows.examples.lines[rows.row_items(r)[0]]): rows.batch([r]) for r in range(len(rows))}
    want = tok(rec["prompt"] + rec["completion"])["input_ids"]
    for line, extra in ((1, [tok.eos_token_id]), (2, [])):
        b, ids = by_line[line], want + extra
        np.testing.assert_array_equal(b["targets"][0, :len(ids) - 1], ids[1:])
        assert not b["segment_ids"][0, len(ids) - 1:].any()
        trained = b["targets"][0][b["loss_weights"][0] > 0]
        assert tok.decode(trained) == rec["completion"] + (tok.eos_token if extra else "")


def test_unfinished_must_be_a_boolean_on_a_reply(tmp_path):
    tok = smollm2_tokenizer()
    for rec, match in (({**chat(0, turns=1), "unfinished": "yes"}, "'unfinished' is a str"),
                       ({"text": "Plain.", "unfinished": True}, "applies to a reply")):
        path = write_jsonl(tmp_path / "bad.jsonl", [rec])
        with pytest.raises(DataError, match=match):
            build_datasets(data_part(path, seq_len=64), tok)
