"""Loading HF folders: both config.json forms, shards with an index, bf16, meshes, pickles, remote code, bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import ftjax
from ftjax.errors import LoadError
from ftjax.interop.hf import load_hf
from ftjax.sharding import activation_sharding, make_mesh
from hf_helpers import FAMILIES, MODEL_TOL, hf_logits, jax_logits, max_diff, random_ids, save, tiny_hf, \
    tiny_tokenizer

LLAMA3 = FAMILIES["llama3_rope"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny llama3-rope model, its saved folder, a batch, and its transformers logits."""
    hf = tiny_hf(LLAMA3[0], **LLAMA3[1])
    folder = save(hf, tmp_path_factory.mktemp("llama3"))
    ids = random_ids(4, 10, seed=3)
    return dict(hf=hf, folder=folder, ids=ids, logits=hf_logits(hf, ids))


def _copy_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.safetensors"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _params(model) -> dict:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------- config.json forms


def test_rope_parameters_form(ref):
    written = json.loads((ref["folder"] / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in written
    model = ftjax.load_model(ref["folder"])
    assert model.config.rope.kind == "llama3"
    assert max_diff(jax_logits(model, ref["ids"]), ref["logits"]) <= MODEL_TOL


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_classic_config_form(ref, tmp_path, type_key):
    """A hand-written hub-style config: `rope_theta` at the top level and `rope_scaling` (new or old key)."""
    cfg = json.loads((ref["folder"] / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope[type_key] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    folder = _copy_weights(ref["folder"], tmp_path)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_hf(folder)
    assert model.config.rope.kind == "llama3" and model.config.rope.theta == 50000.0
    assert max_diff(jax_logits(model, ref["ids"]), ref["logits"]) <= MODEL_TOL
    # transformers itself reads the hand-written form as the same model
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    assert max_diff(hf_logits(again, ref["ids"]), ref["logits"]) <= MODEL_TOL


# ----------------------------------------------------------------------------- weights


def test_several_shards_with_index(ref, tmp_path):
    folder = save(ref["hf"], tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    model = load_hf(folder)
    assert max_diff(jax_logits(model, ref["ids"]), ref["logits"]) <= MODEL_TOL
    # without the index every shard is scanned: the same parameters, bit for bit
    (folder / "model.safetensors.index.json").unlink()
    single, scanned = _params(load_hf(ref["folder"])), _params(load_hf(folder))
    assert single.keys() == scanned.keys()
    for k in single:
        np.testing.assert_array_equal(scanned[k], single[k])


def test_bf16_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf("qwen2", **FAMILIES["qwen2"][1])
    folder = save(hf.to(torch.bfloat16), tmp_path)
    header_len = struct.unpack("<Q", (folder / "model.safetensors").read_bytes()[:8])[0]
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    ids = random_ids(2, 9, seed=4)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = load_hf(folder, dtype="float32")
    assert max_diff(jax_logits(model, ids), hf_logits(reference, ids)) <= MODEL_TOL
    # bf16 params hold the file's bits exactly
    low = load_hf(folder, dtype="bfloat16")
    emb = low.embed_tokens[...]
    assert emb.dtype == jnp.bfloat16
    expected = hf.model.embed_tokens.weight.detach().float().numpy().astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(emb).view(np.uint16), expected.view(np.uint16))


@pytest.fixture(scope="module")
def one_device_logits(ref):
    logits = jax_logits(load_hf(ref["folder"]), ref["ids"])
    assert max_diff(logits, ref["logits"]) <= MODEL_TOL
    return logits


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_on_eight_devices_matches_one(ref, one_device_logits, shape):
    assert jax.device_count() == 8
    mesh = make_mesh(*shape)
    model = load_hf(ref["folder"], mesh=mesh)
    data, fsdp, tensor = shape
    emb = model.embed_tokens[...]
    assert emb.sharding.mesh == mesh
    assert {s.data.shape for s in emb.addressable_shards} == {(128 // tensor, 64 // fsdp)}
    up = model.layers.mlp.up_proj.kernel[...]  # [layers, embed, mlp]
    assert {s.data.shape for s in up.addressable_shards} == {(2, 64 // fsdp, 128 // tensor)}
    assert len(up.addressable_shards) == 8
    expected = one_device_logits
    assert max_diff(jax_logits(model, ref["ids"]), expected) <= MODEL_TOL

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        with activation_sharding(mesh):
            return nnx.merge(graphdef, state)(ids)

    assert max_diff(forward(state, jnp.asarray(ref["ids"], jnp.int32)), expected) <= MODEL_TOL


# ----------------------------------------------------------------------------- safe loading


def _pickled_folder(ref, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text((ref["folder"] / "config.json").read_text())
    torch.save(ref["hf"].state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_read_weights_only(ref, tmp_path):
    folder = _pickled_folder(ref, tmp_path / "pickled")
    model = load_hf(folder)
    assert max_diff(jax_logits(model, ref["ids"]), ref["logits"]) <= MODEL_TOL


class _Evil:
    """A pickle payload that would create a file if it were ever unpickled with full pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_refused(ref, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((ref["folder"] / "config.json").read_text())
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Evil(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(LoadError, match="weights-only") as e:
        load_hf(folder)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_pickled_refused_without_torch(ref, tmp_path):
    folder = _pickled_folder(ref, tmp_path / "pickled")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        from ftjax.errors import LoadError
        from ftjax.interop.hf import load_hf
        try:
            load_hf({str(folder)!r})
        except LoadError as e:
            print("LOADERROR:" + str(e))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("LOADERROR:")]
    assert out.returncode == 0 and len(lines) == 1, out.stderr[-2000:]
    assert "pickle" in lines[0] and "safetensors" in lines[0] and str(folder) in lines[0]


def test_remote_code_never_runs(ref, tmp_path):
    """auto_map in config.json and tokenizer_config.json points at code that would drop a marker file."""
    folder = _copy_weights(ref["folder"], tmp_path / "remote")
    marker = tmp_path / "remote_code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    cfg = json.loads((ref["folder"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tiny_tokenizer().save_pretrained(folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["evil.Evil", "evil.Evil"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    model = ftjax.load_model(folder)
    tok = ftjax.load_tokenizer(folder)
    assert not marker.exists()
    assert max_diff(jax_logits(model, ref["ids"]), ref["logits"]) <= MODEL_TOL
    assert tok("w1 w2")["input_ids"] == tiny_tokenizer()("w1 w2")["input_ids"]
    assert not marker.exists()


# ----------------------------------------------------------------------------- bad input


def _one_line_error(path, match: str) -> str:
    with pytest.raises(LoadError, match=match) as e:
        ftjax.load_model(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _one_line_error(tmp_path, "no config.json")


def test_unknown_model_type(ref, tmp_path):
    folder = _copy_weights(ref["folder"], tmp_path)
    cfg = json.loads((ref["folder"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    msg = _one_line_error(folder, "model_type 'gpt2' is not supported")
    assert all(t in msg for t in ("llama", "mistral", "qwen2", "qwen3"))


def test_missing_tensor(ref, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "config.json").write_text((ref["folder"] / "config.json").read_text())
    tensors = load_file(ref["folder"] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    _one_line_error(folder, "tensor model.layers.1.mlp.up_proj.weight is missing")


def test_truncated_safetensors(ref, tmp_path):
    folder = _copy_weights(ref["folder"], tmp_path)
    (folder / "config.json").write_text((ref["folder"] / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    msg = _one_line_error(folder, "truncated")
    assert "model.safetensors" in msg


def test_missing_shard_in_index(ref, tmp_path):
    folder = save(ref["hf"], tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(folder.glob("*.safetensors"))[-1]
    victim.unlink()
    _one_line_error(folder, f"shard {victim.name} .* is missing")
