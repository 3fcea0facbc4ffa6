"""Task evaluation: few-shot prompts as chat turns (token ids vs apply_chat_template), batched greedy replies
vs one-at-a-time generation, scores, and the reference loss vs numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.data.records import Record
from ftjax.errors import DataError
from ftjax.data.retain import as_messages
from ftjax.evaluation.conversations import few_shot_turns, pick_shots, split_reply
from ftjax.evaluation.scorers import make_scorer
from ftjax.config import default_config
from ftjax.evaluation.task import evaluate_task, reference_sequences
from ftjax.generate import encode_chat, generate
from ftjax.models.llama import Llama
from hf_helpers import MODEL_TOL, tiny_tokenizer
from train_helpers import TINY


def chat(*turns, source="t:1"):
    return Record(source, "chat", tuple(turns))


EVAL = chat(("system", "w50"), ("user", "w1 w2 w3"), ("assistant", "w4 w5"))
SHOTS = [chat(("user", "w6 w7"), ("assistant", "w8")),
         chat(("system", "w99"), ("user", "w9"), ("assistant", "w10 w11 w12"))]
HAND = [{"role": "system", "content": "w50"},  # the eval prompt's system turn first; shots' own dropped
        {"role": "user", "content": "w6 w7"}, {"role": "assistant", "content": "w8"},
        {"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10 w11 w12"},
        {"role": "user", "content": "w1 w2 w3"}]


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_few_shot_prompt_renders_shots_as_turns():
    tok = tiny_tokenizer()
    prompt, reference = split_reply(EVAL)
    assert reference == "w4 w5"
    turns = few_shot_turns(prompt, SHOTS)
    assert as_messages(turns) == HAND
    assert encode_chat(tok, as_messages(turns)) == template_ids(tok, HAND)
    assert few_shot_turns(prompt, []) == prompt


@pytest.mark.slow
def test_few_shot_ids_match_transformers_smollm2(hf_smollm2_tokenizer):
    """ftjax's GGUF tokenizer renders the k-shot chat to the same ids as transformers' own tokenizer."""
    import ftjax

    ours = ftjax.load_tokenizer("smollm2-135m-instruct")
    shots = [chat(("user", "Extract: Ana is 31."), ("assistant", '{"name": "Ana", "age": 31}')),
             chat(("user", "Extract: Bo, 40."), ("assistant", '{"name": "Bo", "age": 40}'))]
    prompt, _ = split_reply(chat(("user", "Extract: Cy (22) lives in Oslo."), ("assistant", "{}")))
    messages = as_messages(few_shot_turns(prompt, shots))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert encode_chat(ours, messages) == template_ids(hf_smollm2_tokenizer, messages)


def test_pick_shots():
    pool = [chat(("user", f"w{i}"), ("assistant", f"w{i + 1}"), source=f"t:{i}") for i in range(1, 30)]
    a, b = pick_shots(pool, 3, seed=4), pick_shots(pool, 3, seed=4)
    assert a == b and len({r.source for r in a}) == 3
    assert pick_shots(pool, 3, seed=5) != a
    assert pick_shots(pool, 0) == []
    with pytest.raises(DataError, match="eval.few_shot=40"):
        pick_shots(pool, 40)


def forward(m):
    graphdef, state = nnx.split(m)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(fn(state, np.asarray(ids, np.int32)[None])[0], np.float64)


def test_evaluate_task_matches_single_generation_and_numpy_loss():
    """Batched (sorted, padded) replies equal one-prompt generation; scores average the scorer; eval_loss is
    the mean NLL of the reference tokens plus the end-of-turn token, from the full logits."""
    tok = tiny_tokenizer()
    model = Llama(TINY.replace(vocab_size=128), rngs=nnx.Rngs(2))
    prompts = [(("user", "w1 w2 w3"),), (("user", "w4"),), (("system", "w5"), ("user", "w6 w7 w8 w9 w10 w11")),
               (("user", "w12 w13"),), (("user", "w14 w15 w16 w17"),)]
    single = [generate(model, tok, as_messages(p), max_new_tokens=6) for p in prompts]
    references = ["w20 w21"] * len(prompts)
    references[1] = single[1]  # one example the model gets exactly right
    records = [chat(*p, ("assistant", r)) for p, r in zip(prompts, references)]

    result = evaluate_task(model, tok, records, "exact,contains", batch_size=2, max_new_tokens=6)
    assert result.replies == single
    want = [make_scorer("exact,contains")(r, e) for r, e in zip(single, references)]
    assert result.per_example == want
    assert result.scores["exact"] == pytest.approx(np.mean([w["exact"] for w in want]))
    assert result.scores["exact"] >= 1 / len(prompts)

    ref = forward(model)
    total, count = 0.0, 0
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for p, r in zip(prompts, references):
        prompt_ids = encode_chat(tok, as_messages(p))
        reply_ids = tok(r, add_special_tokens=False)["input_ids"] + [eos]
        ids = prompt_ids + reply_ids
        logits = ref(ids)[:-1]
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        for t in range(len(prompt_ids) - 1, len(ids) - 1):
            total -= logp[t, ids[t + 1]]
            count += 1
    assert result.eval_loss == pytest.approx(total / count, abs=MODEL_TOL)
    assert result.sample(1) == {"prompt": "w4", "expected": references[1], "reply": single[1],
                                "scores": want[1]}


def test_a_quick_report_scores_the_eval_loss_on_the_task_rows_examples():
    """eval.report=quick: the eval loss over the scored examples only, the figure the full loss has on them."""
    from ftjax.evaluation import report_size

    tok = tiny_tokenizer()
    model = Llama(TINY.replace(vocab_size=128), rngs=nnx.Rngs(2))
    records = [chat(("user", f"w{i} w{i + 1}"), ("assistant", f"w{i + 2} w{i + 3}")) for i in range(10, 15)]
    quick = evaluate_task(model, tok, records, "exact", max_examples=2, max_new_tokens=4, loss_on_all=False)
    alone = evaluate_task(model, tok, records[:2], "exact", max_new_tokens=4)
    full = evaluate_task(model, tok, records, "exact", max_examples=2, max_new_tokens=4)
    assert (quick.n, quick.loss_n, full.loss_n) == (2, 2, 5)
    assert quick.eval_loss == pytest.approx(alone.eval_loss, abs=MODEL_TOL) and quick.scores == full.scores
    c = default_config()  # by default each model's eval loss is on the examples its task row scores
    assert (report_size.max_examples(c), report_size.loss_on_all(c), report_size.identity(c)) == (
        200, False, {"loss_examples": "scored"})
    c.eval.loss_examples = "all"  # every eval record: the key cached results had before the default changed
    assert (report_size.max_examples(c), report_size.loss_on_all(c), report_size.identity(c)) == (200, True, {})
    c.eval.report = "quick"
    assert (report_size.max_examples(c), report_size.loss_on_all(c)) == (report_size.QUICK_EXAMPLES, False)
    c.eval.report = "none"
    assert not report_size.reports(c)


def test_prompted_eval_measures_only_the_final_reply():
    tok = tiny_tokenizer()
    prompt, reference = split_reply(EVAL)
    ids, trained = reference_sequences(tok, [few_shot_turns(prompt, SHOTS)], [reference])[0]
    assert list(ids) == template_ids(tok, HAND) + tok("w4 w5 <|im_end|>", add_special_tokens=False)["input_ids"]
    assert np.nonzero(trained)[0].tolist() == [len(ids) - 3, len(ids) - 2, len(ids) - 1]
