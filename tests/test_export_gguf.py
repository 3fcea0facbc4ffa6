"""GGUF export: the merged model as llama.cpp's file, read back by ftjax, transformers and (if installed) llama.cpp."""

import numpy as np
import pytest
from flax import nnx

import ftjax
from ftjax.errors import ConfigError
from ftjax.interop.export_gguf import QUANTS, export_gguf
from ftjax.interop.export_hf import hf_tensor_plans
from ftjax.interop.gguf import read_gguf_header
from ftjax.interop.gguf_vocab import _pre_name
from ftjax.interop.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT
from ftjax.lora import apply_lora, merged
from hf_helpers import MODEL_TOL, hf_logits, jax_logits, max_diff, random_ids, randomize_lora_b, tiny_hf, tiny_tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 320  # 256 byte symbols + merges + specials: the smallest byte-level BPE
TEXTS = ["Hello world, the quick brown fox jumps over the lazy dog 12345.",
         "She sells sea shells by the sea shore; Peter Piper picked a peck of pickled peppers!"] * 4
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LORA_MARGIN = 1e-2


def bpe_tokenizer():
    """A byte-level BPE (gpt2-style) fast tokenizer with ChatML specials, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random transformers Llama (untied head) with a byte-level BPE tokenizer, as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny_bpe")
    tiny_hf("llama", vocab_size=VOCAB).save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tuned(source):
    model = ftjax.load_model(source)
    apply_lora(model, 4, 8.0, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", rngs=nnx.Rngs(1))
    return randomize_lora_b(model, 1)


@pytest.fixture(scope="module")
def merged_hf(tuned):
    """The merged model's HF tensors (ftjax.lora.merged, then HF names and layout), float32."""
    return {p.name: p.fetch() for p in hf_tensor_plans(merged(tuned), "float32")}


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf `permute` of q/k rows, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _ggml_type(w, quant):
    return gguf.GGMLQuantizationType.F32 if w.ndim == 1 else gguf.GGMLQuantizationType[QUANTS[quant][0]]


def _rounded(w, quant):
    """w as the file stores it, read back to float32."""
    qtype = _ggml_type(w, quant)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_tensors_are_gguf_quantize_of_the_merged_weights(tuned, merged_hf, source, quant, tmp_path):
    out = export_gguf(tuned, tmp_path / "m.gguf", source=source, quant=quant)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # written as m.gguf.partial, then renamed
    reader = gguf.GGUFReader(out)
    cfg = tuned.config
    written = {t.name: t for t in reader.tensors}
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for hf_name, w in merged_hf.items():
        if hf_name not in names:
            _, _, layer, *mid, _ = hf_name.split(".")
            names[hf_name] = f"blk.{layer}.{short['.'.join(mid)]}.weight"
    assert set(written) == set(names.values())
    for hf_name, w in merged_hf.items():
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            w = _permute(w, cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads)
        qtype = _ggml_type(w, quant)
        t = written[names[hf_name]]
        assert t.tensor_type == qtype, hf_name
        expected = gguf.quants.quantize(w, qtype) if qtype != gguf.GGMLQuantizationType.F16 else w.astype(np.float16)
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(expected).tobytes(), hf_name
    md = read_gguf_header(out).metadata
    assert md["general.file_type"] == int(gguf.LlamaFileType[QUANTS[quant][1]])


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_1"])
def test_ftjax_and_transformers_read_the_file_as_the_rounded_merged_model(tuned, merged_hf, source, quant,
                                                                          tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    ids = random_ids(2, 12, seed=5, vocab=VOCAB)
    out = export_gguf(tuned, tmp_path / f"m-{quant}.gguf", source=source, quant=quant)
    ours = jax_logits(ftjax.load_model(out), ids)
    theirs = hf_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                            dtype=torch.float32).eval(), ids)
    reference = tiny_hf("llama", vocab_size=VOCAB)
    reference.load_state_dict({k: torch.from_numpy(np.array(_rounded(w, quant))) for k, w in merged_hf.items()})
    expected = hf_logits(reference, ids)
    assert max_diff(ours, theirs) <= MODEL_TOL
    assert max_diff(ours, expected) <= MODEL_TOL
    assert max_diff(expected, jax_logits(ftjax.load_model(source), ids)) > LORA_MARGIN  # the adapters are in


def test_tokenizer_and_chat_template_survive_the_round_trip(tuned, source, tmp_path):
    out = export_gguf(tuned, tmp_path / "m.gguf", source=source, quant="q8_0")
    original, read_back = ftjax.load_tokenizer(source), ftjax.load_tokenizer(out)
    for text in TEXTS[:2] + ["<|im_start|>user\nHi 42 <|im_end|>", "unseen wörds ✓"]:
        assert read_back.encode(text) == original.encode(text), text
    chat = [{"role": "user", "content": "Hello world"}]
    assert (read_back.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) ==
            original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    md = read_gguf_header(out).metadata
    assert md["tokenizer.ggml.pre"] == "gpt2" and len(md["tokenizer.ggml.tokens"]) == VOCAB
    assert md["tokenizer.ggml.tokens"][-1] == f"[PAD{VOCAB - 1}]"  # ids the tokenizer lacks
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (
        original.bos_token_id, original.eos_token_id)


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "Metaspace", "replacement": "▁"}, None),
])
def test_pre_tokenizer_names_follow_the_gguf_reader(pre, name):
    assert _pre_name(pre) == name


def test_refusals_are_one_line(tuned, source, tmp_path):
    with pytest.raises(ConfigError, match="llama-quantize") as e:
        export_gguf(tuned, tmp_path / "k.gguf", source=source, quant="q4_k_m")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="choose: f32"):
        export_gguf(tuned, tmp_path / "x.gguf", source=source, quant="q3")
    mistral = ftjax.load_model(_saved(tmp_path / "mistral", tiny_hf("mistral", vocab_size=VOCAB, sliding_window=4)))
    with pytest.raises(ConfigError, match="no sliding-window attention"):
        export_gguf(mistral, tmp_path / "w.gguf", source=tmp_path / "mistral")
    words = tmp_path / "words"
    tiny_hf("llama").save_pretrained(words)
    tiny_tokenizer().save_pretrained(words)
    with pytest.raises(ConfigError, match="only byte-level BPE"):
        export_gguf(ftjax.load_model(words), tmp_path / "t.gguf", source=words)
    assert not (tmp_path / "k.gguf").exists() and not (tmp_path / "t.gguf").exists()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3_window"])
def test_families_llama_cpp_runs_differently_are_refused_in_one_line(family, tmp_path):
    """Gemma 2/3 and Phi-3/4 (the MoE families: tests/test_moe.py): llama.cpp has other architectures for them,
    which this export does not write; refused before anything is fetched or written."""
    from hf_helpers import FAMILIES

    model_type, overrides = FAMILIES[family]
    model = ftjax.load_model(_saved(tmp_path / "src", tiny_hf(model_type, vocab_size=VOCAB, **overrides)))
    with pytest.raises(ConfigError, match=f"llama.cpp has no architecture for model_type '{model_type}'") as e:
        export_gguf(model, tmp_path / "m.gguf", source=tmp_path / "src")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def _saved(folder, model):
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


def _smollm2_with_lora():
    model = ftjax.load_model("smollm2-135m-instruct")
    apply_lora(model, 4, 8.0, targets="q_proj,k_proj,v_proj,o_proj", rngs=nnx.Rngs(0))
    return randomize_lora_b(model, 0, std=0.02)


@pytest.mark.slow
def test_smollm2_export_matches_the_shipped_file_layout(smollm2_gguf_path, tmp_path):
    out = export_gguf(_smollm2_with_lora(), tmp_path / "smollm2-q8_0.gguf", source="smollm2-135m-instruct",
                      quant="q8_0")
    ours, shipped = read_gguf_header(out), read_gguf_header(smollm2_gguf_path)
    assert list(ours.metadata) != [] and set(ours.metadata) == set(shipped.metadata)
    assert {k for k in ours.metadata if ours.metadata[k] != shipped.metadata[k]} == {"general.file_type"}
    assert {n: t.shape for n, t in ours.tensors.items()} == {n: t.shape for n, t in shipped.tensors.items()}


@pytest.mark.slow
def test_smollm2_export_runs_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _smollm2_with_lora()
    out = export_gguf(model, tmp_path / "smollm2-f32.gguf", source="smollm2-135m-instruct", quant="f32")
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 30]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], np.float32)
    ours = jax_logits(merged(model), np.array([ids]))[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert max_diff(theirs, ours) <= 1e-2  # llama.cpp's own f32 kernels (accumulation order, fast exp)


# transformers' GGUF loader sets no `attention_bias` for llama (it drops the biases) and maps no
# `key_length` to qwen3's head_dim (it assumes 128): those files are checked in ftjax only.
@pytest.mark.parametrize("model_type, overrides, transformers_reads", [
    ("llama", dict(attention_bias=True), False),  # q/k biases permuted with their rows
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True), True),
    ("qwen2", dict(tie_word_embeddings=True), True),
    ("qwen3", dict(head_dim=24), False),  # head_dim != hidden / heads: key_length / value_length
    ("qwen3", dict(head_dim=128), True),
], ids=["llama_attention_bias", "llama_mqa_tied", "qwen2", "qwen3_head_dim_24", "qwen3"])
def test_other_families_read_back_in_ftjax_and_transformers(model_type, overrides, transformers_reads, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = _saved(tmp_path / "src", tiny_hf(model_type, vocab_size=VOCAB, **overrides))
    model = ftjax.load_model(folder)
    ids = random_ids(2, 10, seed=2, vocab=VOCAB)
    out = export_gguf(model, tmp_path / "m.gguf", source=folder, quant="f32")
    ours = jax_logits(model, ids)
    assert max_diff(jax_logits(ftjax.load_model(out), ids), ours) <= MODEL_TOL
    if transformers_reads:
        theirs = hf_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                                dtype=torch.float32).eval(), ids)
        assert max_diff(theirs, ours) <= MODEL_TOL
