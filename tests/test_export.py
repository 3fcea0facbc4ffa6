"""Export back to the ecosystem: merged HF folders load in transformers and ftjax, PEFT adapters load in PEFT,
training workdirs load as models, LoRA checkpoints hold only the adapters. fp32 throughout."""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ftjax
from ftjax.checkpoint import Checkpoints
from ftjax.errors import ConfigError, LoadError
from ftjax.interop.export_hf import export_hf
from ftjax.interop.peft import export_peft, load_peft
from ftjax.lora import apply_lora, linears, merged
from hf_helpers import (FAMILIES, MODEL_TOL, TINY, hf_logits, jax_logits, max_diff, random_ids, randomize_lora_b,
                        tiny_hf, tiny_tokenizer)
from loop_helpers import ROOT, load_config

GGUF_TOL = 1e-3  # the real SmolLM2 against transformers, as in test_smollm2 (30 layers of fp32 rounding)
LORA_MARGIN = 1e-2  # adapters with non-zero B move the logits by far more than this
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
FAMILY_TARGETS = {"phi3": "qkv_proj,gate_up_proj"}  # Phi-3's fused projections, one adapter over each


def _tuned(folder, *, rslora=False, targets=TARGETS, seed=1):
    model = ftjax.load_model(folder)
    apply_lora(model, 4, 8.0, targets=targets, rslora=rslora, rngs=nnx.Rngs(seed))
    return randomize_lora_b(model, seed)


def _hf(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random transformers Llama (untied head) with its tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    tiny_hf("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids():
    return random_ids(2, 12, seed=3)


# --- HF export ---

def test_hf_export_loads_in_transformers_with_ftjax_logits(tiny_folder, ids, tmp_path):
    model = _tuned(tiny_folder)
    ours = jax_logits(model, ids)
    out = export_hf(model, tmp_path / "out", source=tiny_folder, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert sorted(p.name for p in out.glob("model*.safetensors")) == shards
    theirs = hf_logits(_hf(out), ids)
    assert max_diff(theirs, ours) <= MODEL_TOL
    assert max_diff(theirs, hf_logits(_hf(tiny_folder), ids)) > LORA_MARGIN  # the adapters were folded in
    assert set(index["weight_map"]) == set(_hf(tiny_folder).state_dict())  # every tensor, untied head included


def test_hf_export_carries_config_tokenizer_and_generation_config(tiny_folder, tmp_path):
    out = export_hf(_tuned(tiny_folder), tmp_path / "out", source=tiny_folder, dtype="bfloat16")
    source = json.loads((tiny_folder / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    kept = {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype", "architectures")}
    assert {k: config[k] for k in kept} == kept
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (source["bos_token_id"], source["eos_token_id"])
    ref, got = tiny_tokenizer(), ftjax.load_tokenizer(out)
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    assert got.apply_chat_template(messages) == ref.apply_chat_template(messages)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_exported_folder_loads_back_into_ftjax_identically(tiny_folder, ids, tmp_path):
    model = merged(_tuned(tiny_folder))
    out = export_hf(model, tmp_path / "out", source=tiny_folder, max_shard_size="100KB")
    back = ftjax.load_model(out)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    np.testing.assert_array_equal(jax_logits(back, ids), jax_logits(model, ids))


def test_export_of_a_sharded_model_equals_the_unsharded_export(tiny_folder, tmp_path):
    """fsdp x tensor sharded adapters and base export tensor by tensor to the same bytes as one device."""
    from safetensors.numpy import load_file

    from ftjax.sharding import make_mesh, state_shardings

    model = _tuned(tiny_folder)
    plain = load_file(export_hf(model, tmp_path / "plain", source=tiny_folder) / "model.safetensors")
    graphdef, state = nnx.split(model)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded_state = jax.device_put(state, state_shardings(state, mesh))
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded_state))
    out = export_hf(nnx.merge(graphdef, sharded_state), tmp_path / "sharded", source=tiny_folder)
    sharded = load_file(out / "model.safetensors")
    assert sharded.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(sharded[name], plain[name], err_msg=name)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3", "phi4_mini_partial_rotary"])
def test_hf_export_of_other_families(family, tmp_path):
    """Biases (qwen2, tied head), q/k norms (qwen3), Gemma's (1 + w) and post-norms, Phi's fused projections
    go out under transformers' names."""
    model_type, overrides = FAMILIES[family]
    source = tmp_path / "source"
    tiny_hf(model_type, **overrides).save_pretrained(source)
    model = _tuned(source, targets=FAMILY_TARGETS.get(model_type, "q_proj,v_proj,up_proj"))
    ids = random_ids(1, 8)
    out = export_hf(model, tmp_path / "out", source=source)
    assert max_diff(hf_logits(_hf(out), ids), jax_logits(model, ids)) <= MODEL_TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_built_from_a_model_config_maps_back_to_it(family):
    """Models without an HF source (the built-in tiny one) get a config.json that reads back the same."""
    from transformers import AutoConfig

    from ftjax.interop.hf_config import config_from_model
    from ftjax.models.registry import config_from_hf

    model_type, overrides = FAMILIES[family]
    cfg = config_from_hf(AutoConfig.for_model(model_type, **{**TINY, **overrides}).to_dict())
    assert config_from_hf(config_from_model(cfg)).replace(extra=()) == cfg.replace(extra=())
    built = AutoConfig.for_model(**config_from_model(cfg)).to_dict()  # transformers' strict configs accept it
    assert config_from_hf(built).replace(extra=()) == cfg.replace(extra=())


# --- PEFT export ---

@pytest.mark.parametrize("rslora,targets", [(False, TARGETS), (True, "q_proj,v_proj,down_proj")])
def test_peft_export_loads_in_peft_with_ftjax_logits(tiny_folder, ids, tmp_path, rslora, targets):
    from peft import PeftModel

    model = _tuned(tiny_folder, rslora=rslora, targets=targets)
    out = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_folder))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8.0, rslora)
    assert config["target_modules"] == sorted(targets.split(","))
    base = _hf(tiny_folder)
    base_logits = hf_logits(base, ids)
    theirs = hf_logits(PeftModel.from_pretrained(base, str(out)).eval(), ids)
    ours = jax_logits(model, ids)
    assert max_diff(theirs, ours) <= MODEL_TOL
    assert max_diff(theirs, base_logits) > LORA_MARGIN


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3_window"])
def test_peft_export_of_other_families(family, ids, tmp_path):
    """Default targets (Phi-3: over its fused qkv_proj / gate_up_proj, exported as is) load in PEFT with
    ftjax's logits."""
    from peft import PeftModel

    model_type, overrides = FAMILIES[family]
    source = tmp_path / "source"
    hf = tiny_hf(model_type, **overrides)
    hf.save_pretrained(source)
    model = _tuned(source)
    out = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(source))
    theirs = hf_logits(PeftModel.from_pretrained(hf, str(out)).eval(), ids)
    assert max_diff(theirs, jax_logits(model, ids)) <= MODEL_TOL
    assert max_diff(theirs, hf_logits(tiny_hf(model_type, **overrides), ids)) > LORA_MARGIN


def test_peft_adapter_names_its_hf_folder_base_so_auto_peft_loads_it(tiny_folder, ids, tmp_path):
    """base_model_name_or_path is the base's absolute folder: AutoPeftModelForCausalLM needs nothing else."""
    import torch
    from peft import AutoPeftModelForCausalLM

    model = _tuned(tiny_folder)
    out = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_folder))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_folder.resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert max_diff(hf_logits(loaded, ids), jax_logits(model, ids)) <= MODEL_TOL


def test_peft_base_reference_for_gguf_bases_is_the_folder_and_file(tmp_path):
    from ftjax.interop.peft import base_reference
    from ftjax.interop.smollm2 import default_gguf_path

    gguf = default_gguf_path()
    assert base_reference("smollm2-135m-instruct") == (str(gguf.resolve().parent), gguf.name)
    assert base_reference(gguf) == (str(gguf.resolve().parent), gguf.name)
    assert base_reference(tmp_path) == (str(tmp_path.resolve()), None)
    assert base_reference("org/some-hub-model") == ("org/some-hub-model", None)


def test_peft_adapter_reads_back_into_ftjax(tiny_folder, ids, tmp_path):
    model = _tuned(tiny_folder, rslora=True)
    out = export_peft(model, tmp_path / "adapter")
    back = load_peft(ftjax.load_model(tiny_folder), out)
    np.testing.assert_array_equal(jax_logits(back, ids), jax_logits(model, ids))
    with pytest.raises(LoadError, match="not a PEFT adapter folder"):
        load_peft(ftjax.load_model(tiny_folder), tmp_path)


# --- training workdirs ---

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A short LoRA run of configs/tiny_test.py (no eval data): checkpoints at steps 1 and 2."""
    from ftjax.train.loop import run

    c = load_config()
    c.train.steps, c.checkpoint.every, c.data.eval, c.model.remat = 2, 1, "", "none"
    workdir = tmp_path_factory.mktemp("run")
    run(c, workdir)
    return workdir


RUN_IDS = np.array([[1, 5, 9, 200, 3000, 17]])


@pytest.fixture(scope="module")
def workdir_logits(workdir):
    """ftjax.load_model(WORKDIR)'s logits (the best checkpoint: the latest, as the run has no eval loss)."""
    return jax_logits(ftjax.load_model(workdir), RUN_IDS)


def _checkpoint_state(workdir, step):
    """The raw saved tree (nested dicts of arrays), read without a target."""
    return ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_lora_checkpoint_holds_no_base_weights(workdir):
    tree = ocp.PyTreeCheckpointHandler().metadata(workdir / "checkpoints" / "2" / "state").tree
    leaves = [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p), m)
              for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]]
    arrays = [p for p, m in leaves if len(m.shape) > 0]  # scalars: step counts of the optimizer
    assert {p[0] for p in arrays} == {"trainable", "opt_state"}
    assert all({"lora_a", "lora_b"} & set(p) for p in arrays), [p for p in arrays if "lora" not in p]
    saved = sum(int(np.prod(m.shape)) for _, m in leaves)
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ftjax.load_model("tiny-random-llama"))))
    assert saved < base / 50  # adapters and their optimizer moments only


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_load_model_of_a_workdir_equals_merging_the_checkpoint_by_hand(workdir, workdir_logits):
    c = load_config()
    raw = _checkpoint_state(workdir, 2)["trainable"]
    model = ftjax.load_model("tiny-random-llama")
    base_logits = jax_logits(model, RUN_IDS)
    scale = c.lora.alpha / c.lora.rank
    for path, linear in linears(model):
        node = raw
        for key in path.split("."):
            node = node[key]
        a, b = (np.asarray(node["lora"][k]["value"], np.float64) for k in ("lora_a", "lora_b"))
        kernel = np.asarray(linear.kernel[...], np.float64)
        linear.kernel[...] = jax.numpy.asarray(kernel + scale * np.einsum("lir,lro->lio", a, b), np.float32)
    assert max_diff(workdir_logits, jax_logits(model, RUN_IDS)) <= MODEL_TOL
    assert max_diff(workdir_logits, base_logits) > LORA_MARGIN
    assert ftjax.load_tokenizer(workdir).chat_template == ftjax.load_tokenizer("tiny-random-llama").chat_template


def test_full_fine_tuning_workdir_loads_from_its_checkpoint(tmp_path):
    """A full run's checkpoint holds every weight: the model comes from it alone, and exports as HF."""
    model = ftjax.load_model("tiny-random-llama")
    model.norm.scale[...] = model.norm.scale[...] * 1.5  # "trained": differs from the base
    _, trainable, _ = nnx.split(model, nnx.Param, ...)
    ckpt = Checkpoints(tmp_path, async_save=False)
    ckpt.save(5, {"trainable": trainable, "opt_state": {"count": np.zeros((), np.int32)}}, {"step": 5})
    ckpt.close()
    c = load_config()
    c.method = "full"
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    loaded = ftjax.load_model(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        export_peft(loaded, tmp_path / "adapter")
    out = export_hf(loaded, tmp_path / "hf")  # no source: config.json built from the ModelConfig
    assert max_diff(hf_logits(_hf(out), RUN_IDS), jax_logits(model, RUN_IDS)) <= MODEL_TOL


def test_checkpoint_choice_best_latest_or_a_step(tmp_path):
    from ftjax.workdir import select_step

    ckpt = Checkpoints(tmp_path, keep=5, keep_best=True, async_save=False)
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        ckpt.save(step, {"x": np.zeros(2)}, {"step": step}, eval_loss=loss)
    ckpt.close()
    ckpt = Checkpoints(tmp_path, read_only=True)
    assert [select_step(ckpt, s, tmp_path) for s in ("best", None, "latest", 1, "3")] == [2, 2, 3, 1, 3]
    with pytest.raises(LoadError, match="no checkpoint at step 7"):
        select_step(ckpt, 7, tmp_path)
    ckpt.close()


def _export_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_export_script_writes_an_hf_folder_of_the_run(workdir, workdir_logits, tmp_path):
    out = tmp_path / "hf"
    proc = _export_script(f"--workdir={workdir}", "--format=hf", f"--out={out}", "--step=latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"exported step 2 of {workdir} as hf" in proc.stdout
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # tied embeddings
    assert max_diff(hf_logits(_hf(out), RUN_IDS), workdir_logits) <= MODEL_TOL


def test_export_script_refuses_peft_for_full_fine_tuning(tmp_path):
    c = load_config()
    c.method = "full"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    proc = _export_script(f"--workdir={tmp_path}", "--format=peft", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--format=peft needs a LoRA run" in lines[0] and "--format=hf" in lines[0]


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_export_script_writes_a_gguf_of_the_run(workdir, workdir_logits, tmp_path):
    proc = _export_script(f"--workdir={workdir}", "--format=gguf", "--quant=f32", f"--out={tmp_path}",
                          "--step=latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "model-f32.gguf"
    assert f"exported step 2 of {workdir} as gguf to {out}" in proc.stdout
    assert max_diff(jax_logits(ftjax.load_model(out), RUN_IDS), workdir_logits) <= MODEL_TOL
    assert ftjax.load_tokenizer(out).encode("Hi 42 <|im_end|>") == ftjax.load_tokenizer(workdir).encode(
        "Hi 42 <|im_end|>")
    proc = _export_script(f"--workdir={workdir}", "--format=gguf", "--quant=Q4_K_M", f"--out={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "llama-quantize" in lines[0]


# --- SmolLM2, from its GGUF ---

@pytest.mark.slow
def test_smollm2_exports_load_in_peft_and_transformers(smollm2_gguf_path, hf_smollm2, tmp_path):
    import torch
    from peft import PeftModel

    model = ftjax.load_model(smollm2_gguf_path)
    apply_lora(model, 8, 16.0, targets="q_proj,v_proj,down_proj", rngs=nnx.Rngs(0))
    randomize_lora_b(model, 0, std=0.05)
    ids = np.array([[1, 504, 3458, 314, 260, 3575, 30]])
    ours = jax_logits(model, ids)

    adapter = export_peft(model, tmp_path / "adapter", base_model_name_or_path="smollm2-135m-instruct")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_gguf_path.resolve().parent)
    assert f"gguf_file={smollm2_gguf_path.name!r}" in (adapter / "README.md").read_text()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_smollm2), str(adapter)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()
    del peft_model
    # Whole-model logits against transformers carry SmolLM2's 30-layer fp32 rounding: GGUF_TOL, as in
    # test_smollm2 (the base alone differs by ~8e-5 here, and the last digits follow the CPU's GEMM
    # blocking: 1.28e-4 with the adapter on this machine). The tiny-model PEFT tests hold MODEL_TOL.
    hf_base = hf_logits(hf_smollm2, ids)
    assert max_diff(theirs, ours) <= GGUF_TOL
    assert max_diff(theirs, hf_base) > LORA_MARGIN
    # Without that rounding, both sides in float64, PEFT on the GGUF base and ftjax agree to MODEL_TOL (the
    # same adapter file; ftjax's fp32 islands, e.g. its final logits, stay fp32: ~2e-5 here).
    with jax.enable_x64(True):
        model64 = ftjax.load_model(smollm2_gguf_path, dtype="float64")
        apply_lora(model64, 8, 16.0, targets="q_proj,v_proj,down_proj", rngs=nnx.Rngs(0))
        randomize_lora_b(model64, 0, std=0.05)
        ours64 = jax_logits(model64, ids)
    del model64
    peft64 = PeftModel.from_pretrained(copy.deepcopy(hf_smollm2).double(), str(adapter)).double().eval()
    with torch.no_grad():
        theirs64 = peft64(input_ids=torch.as_tensor(ids)).logits.numpy()
    del peft64
    assert theirs64.dtype == np.float64 and max_diff(theirs64, ours64) <= MODEL_TOL

    # The HF folder holds the merged weights, so it is compared with ftjax running those same weights:
    # merging alone moves SmolLM2's logits (|max| ~30) by ~1e-4 in fp32, in ftjax as in any framework.
    out = export_hf(model, tmp_path / "hf", source=smollm2_gguf_path)
    assert max_diff(hf_logits(_hf(out), ids), jax_logits(merged(model), ids)) <= MODEL_TOL
    assert ftjax.load_tokenizer(out).chat_template == ftjax.load_tokenizer(smollm2_gguf_path).chat_template
