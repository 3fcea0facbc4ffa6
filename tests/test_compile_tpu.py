"""scripts/compile.py on this CPU host: the real TPU program of a run (Mosaic kernels, the TPU's `auto` values,
the chip's HBM), compiled by libtpu for a topology of abstract TPU devices."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from loop_helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                                   reason="libtpu is not installed (pip install -e '.[tpu]')")]
GIB = 1024**3
KEYS = {"topology", "devices", "device_kind", "bytes_per_device", "bytes_per_device_parts", "hbm_bytes_per_device",
        "hbm_source", "fits", "flops_per_step", "formula_flops_per_step", "attention_kernel", "compile_s", "versions",
        "roofline"}
TINY_MOE = dict(model_type="qwen3_moe", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32)


def _compile_script(*args: str) -> subprocess.CompletedProcess:
    """scripts/compile.py as a user runs it: no JAX_PLATFORMS (libtpu installed must stay quiet on a CPU host)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = ""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compile.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tiny_recipe_compiles_the_tpu_program(tmp_path):
    """The acceptance command: exit 0, every key, fits on a v5e chip's 16 GiB HBM (not this host's RAM), the
    TPU's `auto` values (splash, bf16), and the compiled program holds the Mosaic splash kernel."""
    out, hlo = tmp_path / "c.json", tmp_path / "c.txt"
    done = _compile_script("--config=configs/tiny_test.py", "--topology=v5e:2x2", f"--out={out}", f"--hlo={hlo}")
    assert done.returncode == 0, done.stderr
    assert "INVALID_ARGUMENT" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    report = json.loads(out.read_text())
    assert KEYS <= set(report)
    assert report["fits"] is True
    assert (report["devices"], report["device_kind"], report["platform"]) == (4, "TPU v5 lite", "tpu")
    assert report["hbm_bytes_per_device"] == 16 * GIB and report["hbm_source"].startswith("TPU v5 lite HBM")
    assert report["config"]["model.attention"] == "splash" and report["attention_kernel"] == "splash (mosaic)"
    assert (report["config"]["model.dtype"], report["config"]["train.frozen_dtype"]) == ("bfloat16", "bfloat16")
    assert report["config"]["model.remat"] == "minimal"
    text = hlo.read_text()
    assert 'custom_call_target="tpu_custom_call"' in text
    parts = report["bytes_per_device_parts"]
    assert report["bytes_per_device"] == (parts["arguments"] + parts["outputs"] - parts["aliased"]
                                          + parts["temporaries"])
    assert report["roofline"]["label"].startswith("estimate")


def test_tpu_mesh_on_cpu_host_builds_what_a_tpu_host_builds(tmp_path, monkeypatch):
    """In a CPU process, a mesh of abstract TPU devices decides everything: every splash kernel is built for
    Mosaic (no interpret mode), a tiny MoE model's `auto` grouped matmul is the TPU's (ragged_dot), the memory
    check compares with the chip's HBM."""
    import jax

    from ftjax.models import attention, moe
    from ftjax.platform import device_capacity, topology_devices
    from ftjax.sharding import make_mesh
    from ftjax.train.aot import compile_recipe

    assert jax.default_backend() == "cpu"
    built, chosen = [], []
    kernel = attention._splash_kernel
    monkeypatch.setattr(attention, "_splash_kernel", lambda *a: built.append(a[-1]) or kernel(*a))
    grouped = moe.grouped_expert_mlp
    monkeypatch.setattr(moe, "grouped_expert_mlp", lambda impl: chosen.append(grouped(impl)) or chosen[-1])
    recipe = tmp_path / "moe_recipe.py"
    recipe.write_text(f"from ftjax.config import load_recipe\nHF_CONFIG = {TINY_MOE!r}\n\n\ndef get_config():\n"
                      f"    c = load_recipe({str(ROOT / 'configs' / 'tiny_test.py')!r})\n"
                      "    c.model.path = '/nowhere/tiny-moe'\n    return c\n")
    from ftjax.config import load_recipe

    with jax.default_matmul_precision("default"):  # as a run has it (the suite's "highest" is for CPU numerics)
        report = compile_recipe(load_recipe(recipe), recipe, "v5e:2x2", tmp_path / "moe.json",
                                tmp_path / "moe.txt", say=lambda line: None)
    assert built and not any(built), "a splash kernel was built in interpret mode"
    assert chosen and all(fn is moe.ragged_expert_mlp for fn in chosen)
    assert report["config"]["moe.implementation"] == "ragged"
    assert report["mosaic_calls"] > 0 and report["attention_kernel"] == "splash (mosaic)"
    mesh = make_mesh(data=4, devices=topology_devices("v5e:2x2"))
    assert device_capacity(mesh)[0] == 16 * GIB
    assert device_capacity(make_mesh(data=1, devices=jax.devices()[:1]))[1] == "host RAM / local devices"


def test_oversize_run_is_refused_in_one_line(tmp_path):
    """Llama-3-8B without remat on one v5e chip: refused by the estimate before compiling, one line, exit 2."""
    done = _compile_script("--config=configs/llama3_8b_lora.py", "--config.model.remat=none", "--topology=v5e:1x1",
                           f"--out={tmp_path / 'o.json'}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "16.0 GiB" in lines[0] and "does not fit" in lines[0]
    assert all(way in lines[0] for way in ("model.remat=full", "mesh.fsdp", "batch_size"))
    assert not (tmp_path / "o.json").exists()
