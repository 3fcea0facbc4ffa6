"""On-policy sampling (ftjax/objectives/rollouts.py) on the tiny model: the completions are `generate_tokens`' own
for the same seed, cut after their EOS; their log-probs and entropies are those of the distribution each token was
drawn from (the generation's logits at the temperature) and those of an unpacked full-logits forward pass."""

import pytest
import numpy as np
from flax import nnx

from ftjax.api import load_model
from ftjax.generate import generate_tokens
from ftjax.lora import apply_lora
from ftjax.objectives.rollouts import cut_at_eos, sample

TOL = 1e-4  # fp32, a whole model
PROMPTS = [[5, 9, 13], [7, 2], [11, 4, 8, 3, 6], [5, 9, 13]]
TEMPERATURE, NEW = 0.7, 12


def _model():
    model = load_model("tiny-random-llama")
    apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), rngs=nnx.Rngs(1))
    return model


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow  # three generations and passes on the tiny model (~25 s here)
def test_samples_are_generations_with_the_log_probs_they_were_drawn_with():
    model = _model()
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    eos = [3]
    s = sample(graphdef, trainable, frozen, PROMPTS, seed=17, max_new_tokens=NEW, eos_ids=eos, pad_id=0,
               temperature=TEMPERATURE)
    tokens, logits = generate_tokens(model, PROMPTS, max_new_tokens=NEW, eos_ids=eos, pad_id=0,
                                     temperature=TEMPERATURE, seed=17, return_logits=True)
    for i, row in enumerate(tokens):
        completion, truncated = cut_at_eos(row, eos)
        assert s.completions[i] == completion and bool(s.truncated[i]) == truncated
        n = len(completion)
        drawn = _log_softmax(logits[i, :n] / TEMPERATURE)  # the distribution each token was drawn from
        np.testing.assert_allclose(s.logps[i], drawn[np.arange(n), completion], atol=TOL, rtol=TOL)
        # an unpacked forward pass with full logits gives the same
        ids = np.array([PROMPTS[i] + completion], np.int32)
        full = _log_softmax(np.asarray(model(ids[:, :-1]), np.float64)[0, len(PROMPTS[i]) - 1:] / TEMPERATURE)
        np.testing.assert_allclose(s.logps[i], full[np.arange(n), completion], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(s.entropies[i], -(np.exp(full) * full).sum(-1), atol=TOL, rtol=TOL)
    # the same seed, the same samples; another seed, others (the prompt repeated: two different draws)
    again = sample(graphdef, trainable, frozen, PROMPTS, seed=17, max_new_tokens=NEW, eos_ids=eos, pad_id=0,
                   temperature=TEMPERATURE)
    assert again.completions == s.completions
    other = sample(graphdef, trainable, frozen, PROMPTS, seed=18, max_new_tokens=NEW, eos_ids=eos, pad_id=0,
                   temperature=TEMPERATURE)
    assert other.completions != s.completions
    assert s.completions[0] != s.completions[3]
