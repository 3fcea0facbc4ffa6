"""Every recipe in configs/ loads, validates and can be overridden from the command line; bad flags fail in one line.

The bad-flag runs start scripts/train.py with JAX_LOG_COMPILES=1, so any compilation before the
error would add lines to stderr: one line on stderr proves it failed before compiling.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from ftjax import config as config_lib
from ftjax.config import default_config, flat_keys, get, load_recipe, validate
from ftjax.errors import ConfigError
from ftjax.sharding import RULES, parse_rules
from loop_helpers import ROOT, script_env

CONFIGS = sorted((ROOT / "configs").glob("*.py"))

# ARCHITECTURE.md, "The contract users rely on": config keys users set from their launch scripts.
CONTRACT_KEYS = (
    "model.path", "method", "seed", "lora.rank", "lora.alpha", "lora.targets", "data.train", "data.eval",
    "data.seq_len", "data.packing", "data.overlong", "train.batch_size", "train.steps", "train.grad_accum",
    "train.log_every", "train.frozen_dtype", "optim.name", "optim.lr", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "checkpoint.every", "checkpoint.keep", "eval.every", "eval.final", "eval.max_examples",
)


def _get_config(path: Path) -> ConfigDict:
    return load_recipe(path)


def _field_type(c: ConfigDict, key: str) -> type:
    """The declared type of a leaf (a placeholder's type when its value is None)."""
    parent, _, leaf = key.rpartition(".")
    return (get(c, parent) if parent else c).get_type(leaf)


def _other_value(value, kind: type) -> str:
    """A command-line string for a value of `kind` that differs from `value`."""
    if kind is bool:
        return str(not value).lower()
    if kind is int:
        return str(value + 3 if value != -3 else 5)
    if kind is float:  # a float placeholder (None: the model's own value) too
        return repr((value or 0.0) + 0.25)
    if kind is str:
        return f"{value or ''}x"
    raise AssertionError(f"unexpected config type {kind}")


def test_the_recipes_are_all_here():
    names = {p.stem for p in CONFIGS}
    assert {"tiny_test", "smollm2_135m_lora", "smollm2_135m_full", "llama3_8b_lora", "llama3_70b_lora_fsdp",
            "qwen3_8b_lora", "gemma3_4b_lora", "qwen3_30b_a3b_lora"} <= names


def _recipe_shape(name: str):
    """A recipe's HF_CONFIG as ftjax reads it, checked equal to what transformers' own config class makes of it."""
    from transformers import AutoConfig

    from ftjax.config import recipe_module
    from ftjax.models.registry import config_from_hf

    hf = recipe_module(ROOT / "configs" / f"{name}.py").HF_CONFIG
    cfg = config_from_hf(hf)
    assert config_from_hf(AutoConfig.for_model(**hf).to_dict()).replace(extra=()) == cfg.replace(extra=())
    return cfg


def test_gemma3_4b_recipe_shape():
    """Gemma-3-4B's text model as transformers reads it: 34 layers, 5:1 local/global over 1024 tokens,
    query_pre_attn_scalar 256."""
    cfg = _recipe_shape("gemma3_4b_lora")
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size) == (34, 2560, 10240, 8, 4, 256, 262208)
    assert cfg.layer_windows() == ((1024,) * 5 + (None,)) * 5 + (1024,) * 4 and cfg.gemma.query_scale == 256 ** -0.5


def test_qwen3_30b_a3b_recipe_shape():
    """Qwen3-30B-A3B as transformers reads it: 48 layers, 128 experts of 768 with top-8, every layer sparse."""
    cfg = _recipe_shape("qwen3_30b_a3b_lora")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == (48, 2048, 32, 4, 128, 151936)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size) == (128, 8, 768)


@pytest.mark.parametrize("name,devices", [("gemma3_4b_lora", 1), ("qwen3_30b_a3b_lora", 8)])
def test_recipe_docstring_quotes_its_memory_estimate(name, devices):
    """The per-device figures a recipe's docstring quotes are what recipe_estimate computes (on `devices`)."""
    import re

    from ftjax.train.memory import recipe_estimate

    path = ROOT / "configs" / f"{name}.py"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    quoted = {k: float(v) for k, v in re.findall(r"(frozen|LoRA|Adam|activations|total) ([\d.]+) GiB", doc)}
    got = recipe_estimate(path, devices)
    assert quoted == {"frozen": got["frozen"], "LoRA": got["trainable"], "Adam": got["opt_state"],
                      "activations": got["activations"], "total": got["total"]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_locked_valid_and_documents_its_command(path):
    c = _get_config(path)
    assert c.is_locked
    validate(c)
    defaults = default_config()
    assert sorted(flat_keys(c)) == sorted(flat_keys(defaults))  # a recipe overrides keys, it adds none
    for key in CONTRACT_KEYS:
        kind = _field_type(defaults, key)
        assert kind in (bool, int, float, str), (key, kind)
        assert _field_type(c, key) is kind, key  # the recipe kept the key's type
    overridden = [k for k in flat_keys(c) if get(c, k) != get(defaults, k)]
    assert len(overridden) <= 36, overridden  # "a recipe overrides a few dozen at most"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"scripts/train.py --config=configs/{path.name}" in doc  # the launch command is in the docstring


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_key_can_be_set_from_the_command_line(path):
    c = _get_config(path)
    argv, expected = [], {}
    for key in flat_keys(c):
        kind = _field_type(c, key)
        text = _other_value(get(c, key), kind)
        argv.append(f"--config.{key}={text}")
        expected[key] = kind(text) if kind is not bool else text == "true"
    argv = ["train.py", f"--config={path}", *argv]
    fv = flags.FlagValues()
    # sys_argv: config_flags defines a flag for each override it finds there (as scripts/train.py does)
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    parsed = fv.config
    assert parsed.is_locked
    for key, want in expected.items():
        got = get(parsed, key)
        assert type(got) is type(want) and got == want, (key, got, want)


def test_mesh_rules_override_the_table_from_the_command_line_and_bad_names_are_config_errors():
    argv = ["train.py", f"--config={ROOT / 'configs' / 'tiny_test.py'}", "--config.mesh.rules=embed=tensor, mlp=fsdp,"
            "batch=data+fsdp,length=none"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    rules = parse_rules(validate(fv.config).mesh.rules)
    assert rules == {**RULES, "embed": "tensor", "mlp": "fsdp", "batch": ("data", "fsdp"), "length": None}
    assert parse_rules("") == RULES
    for text, message in [("embd=fsdp", "config.mesh.rules: unknown logical axis 'embd'; did you mean 'embed'?"),
                          ("mlp=fsdp+tensr", "config.mesh.rules: 'mlp=fsdp+tensr' names mesh axis 'tensr', not one "
                                             "of data, fsdp, tensor"),
                          ("mlp", "config.mesh.rules: 'mlp' is not logical_axis=mesh_axes")]:
        c = default_config()
        c.mesh.rules = text
        with pytest.raises(ConfigError) as err:
            validate(c)
        assert str(err.value).startswith(message), str(err.value)


def _train(tmp_path: Path, *flag_args: str, devices: int = 4) -> tuple[subprocess.CompletedProcess, float]:
    env = script_env(devices, JAX_LOG_COMPILES="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT / 'configs' / 'tiny_test.py'}",
           f"--workdir={tmp_path / 'run'}", *flag_args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t


@pytest.mark.parametrize("flag_args, message", [
    (["--config.lora.rnak=3"], "error: unknown config key 'lora.rnak'; did you mean 'lora.rank'?"),
    (["--config.data.train=missing.jsonl"], "missing.jsonl"),
    (["--config.mesh.data=3"], "error: mesh data=3 fsdp=1 tensor=1 does not divide the 4 available devices"),
    (["--config.mesh.data=2", "--config.mesh.fsdp=4"], "error: mesh data=2 fsdp=4 tensor=1 does not divide the 4 "
     "available devices"),
], ids=["misspelled-key", "missing-data", "mesh-not-dividing", "mesh-too-big"])
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_bad_flags_fail_in_one_line_before_compiling(tmp_path, flag_args, message):
    proc, seconds = _train(tmp_path, *flag_args)
    print(f"{' '.join(flag_args)}: exit {proc.returncode} after {seconds:.1f} s")  # a figure, not a timed test
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines[:5]
    assert proc.stdout == ""
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_mesh_expert_needs_experts_it_divides():
    """mesh.expert > 1 on a dense model is a one-line ConfigError (a MoE model's non-dividing count: test_moe.py)."""
    from train_helpers import TINY

    c = default_config()
    c.mesh.expert = 2
    with pytest.raises(ConfigError, match=r"^config.mesh.expert=2 splits the experts .* is dense; use mesh.data or "
                                          r"mesh.fsdp$"):
        config_lib.validate_for_model(validate(c), TINY)
    c.mesh.expert = 1
    config_lib.validate_for_model(c, TINY)
    from ftjax.sharding import make_mesh

    assert dict(make_mesh(1, 4, 1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}  # 8 test devices
    with pytest.raises(ConfigError, match="^mesh data=1 fsdp=3 tensor=1 expert=2 does not divide the 8 available"):
        make_mesh(1, 3, 1, 2)
    from ftjax.models.moe import MoEConfig

    recipe = validate(load_recipe(ROOT / "configs" / "qwen3_30b_a3b_lora.py"))  # Qwen3-30B-A3B: 128 experts, top-8
    assert (recipe.mesh.fsdp, recipe.mesh.expert) == (4, 2)
    config_lib.validate_for_model(recipe, TINY.replace(moe=MoEConfig(128, 8, 768)))


def test_every_key_is_checked_in_one_place():
    """Each key of default_config() has exactly one check in config.py's tables (choices, range or free)."""
    keys = flat_keys(config_lib.default_config())
    assert sorted(config_lib.CHECKED_KEYS) == sorted(keys)
    assert len(set(config_lib.CHECKED_KEYS)) == len(config_lib.CHECKED_KEYS)


@pytest.mark.parametrize("key, value, message", [
    ("mesh.fsdp", 0, "config.mesh.fsdp must be >= 1, or -1"), ("optim.eps", 0.0, "config.optim.eps must be > 0"),
    ("checkpoint.keep", 0, "config.checkpoint.keep must be >= 1"), ("lora.alpha", -1.0, "config.lora.alpha must be > 0"),
    ("model.dtype", "float8", "config.model.dtype='float8' is not one of auto, float32"),
    ("eval.max_examples", 0, "config.eval.max_examples must be >= 1"),
])
def test_range_checks_name_the_key(key, value, message):
    c = config_lib.default_config()
    group, name = key.split(".")
    c[group][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_lib.validate(c)
