"""Tiny random transformers models built in the test (no downloads), saved as HF folders, and logits helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4

# Small enough to run in milliseconds, large enough that every mesh axis in the tests divides:
# hidden 64 / fsdp 4, heads*head_dim 64 and kv 32 and mlp 128 and vocab 128 / tensor 2.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)

# name -> (model_type, config overrides): every family and option the decoder claims to support.
FAMILIES = {
    "llama_gqa_untied": ("llama", {}),
    "llama_mqa_tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=4.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8))),
    "linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral_window": ("mistral", dict(sliding_window=4)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=False)),
    "qwen2_layer_windows": ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)),
    "qwen3_layer_windows": ("qwen3", dict(num_hidden_layers=3, head_dim=16, use_sliding_window=True,
                                          sliding_window=4, max_window_layers=2)),
    # soft-caps far below the real 50 / 30 so that they bend these logits; sliding, full, sliding layers
    "gemma2": ("gemma2", dict(head_dim=16, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=24,
                              attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    # a 1:1 pattern on 3 layers (the real 5:1 needs 6), global rope linear-scaled, the local one its own base
    "gemma3": ("gemma3_text", dict(head_dim=16, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=24,
                                   sliding_window_pattern=2, rope_theta=10000.0, rope_local_base_freq=100.0,
                                   rope_scaling=dict(rope_type="linear", factor=2.0))),
    "phi3_window": ("phi3", dict(sliding_window=4)),
    "phi4_mini_partial_rotary": ("phi3", dict(partial_rotary_factor=0.75, tie_word_embeddings=True)),
    # Phi-3.5 / Phi-4-mini's longrope, every position within the original length (short factors, scaled sin/cos)
    "phi4_mini_longrope": ("phi3", dict(partial_rotary_factor=0.75, tie_word_embeddings=True,
                                        original_max_position_embeddings=64,
                                        rope_scaling=dict(rope_type="longrope",
                                                          short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 5.0],
                                                          long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 40.0]))),
}


def tiny_hf(model_type: str = "llama", seed: int = 0, **overrides):
    """A random fp32 transformers model whose norms and biases are far from their 1/0 init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save(model, folder: Path, **kw) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder, **kw)
    return folder


def hf_logits(model, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """Reference fp32 logits from the transformers model."""
    import torch

    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=t(ids), attention_mask=t(attention_mask), position_ids=t(position_ids))
    return out.logits.float().numpy()


def jax_logits(model, ids, positions=None, segment_ids=None) -> np.ndarray:
    import jax.numpy as jnp

    a = lambda x: None if x is None else jnp.asarray(np.asarray(x), jnp.int32)
    return np.asarray(model(a(ids), a(positions), a(segment_ids)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (batch, length)).astype(np.int64)


def tiny_tokenizer(vocab_size: int = TINY["vocab_size"]):
    """A word-level fast tokenizer over `vocab_size` ids with a ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "system", "\n"] + [f"w{i}" for i in range(vocab_size - len(specials) - 5)]
    vocab = {tok: i for i, tok in enumerate(specials + ["<unk>"] + words)}
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "</s>"])
    fast.chat_template = template
    return fast


def randomize_lora_b(model, seed: int, std: float = 0.2):
    """Non-zero LoRA B (a fresh adapter has B = 0, which would make every comparison trivial)."""
    import jax.numpy as jnp

    from ftjax.lora import linears

    rng = np.random.default_rng(seed)
    for _, linear in linears(model):
        if linear.lora is not None:
            b = linear.lora.lora_b
            b[...] = jnp.asarray(rng.normal(0.0, std, b[...].shape), b[...].dtype)
    return model
