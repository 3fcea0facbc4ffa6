"""One workdir loader: scripts/eval.py, scripts/export.py and load_model(WORKDIR) take the same checkpoint
(the best by default, else --step=latest|N) and say which step it is."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import ftjax
from ftjax.checkpoint import Checkpoints
from ftjax.sharding import mesh_from_config
from ftjax.train.compose import compose
from ftjax.train.setup import build_state
from loop_helpers import ROOT, load_config, script_env

EVAL_LOSSES = {1: 3.0, 2: 1.0, 3: 2.0}  # best: step 2; latest: step 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A LoRA workdir whose checkpoints differ: step s has every lora_b = s / 100."""
    path = tmp_path_factory.mktemp("run")
    c = load_config()
    state = build_state(compose(c), mesh_from_config(c.mesh)).state
    ckpt = Checkpoints(path, keep=5, keep_best=True, async_save=False)
    for step, loss in EVAL_LOSSES.items():
        trainable = jax.tree.map(lambda v: v, state.trainable)
        for p, var in nnx.to_flat_state(trainable):
            if p[-1] == "lora_b":
                var.set_value(np.full(var.get_value().shape, step / 100, np.float32))
        ckpt.save(step, {"trainable": trainable, "opt_state": state.opt_state}, {"step": step}, eval_loss=loss)
    ckpt.close()
    (path / "config.json").write_text(c.to_json_best_effort())
    return path


def _b(step: int) -> float:
    """Every lora_b value of checkpoint `step` (as stored, float32)."""
    return float(np.float32(step / 100))


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = script_env()  # one device: which checkpoint, not the mesh, is the subject
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def _lora_b(model) -> set[float]:
    return {float(np.asarray(v.get_value()).flat[0]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
            if p[-1] == "lora_b"}


@pytest.mark.slow
def test_load_model_takes_the_best_checkpoint_or_the_one_asked_for(workdir, capsys):
    assert _lora_b(ftjax.load_model(workdir)) == {_b(2)}
    assert f"{workdir}: checkpoint step 2 (best)" in capsys.readouterr().out
    assert _lora_b(ftjax.load_model(workdir, step="latest")) == {_b(3)}
    assert _lora_b(ftjax.load_model(workdir, step=1)) == {_b(1)}
    assert f"{workdir}: checkpoint step 1 (1)" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_and_export_take_the_same_checkpoint_and_say_which(workdir, tmp_path):
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in ("yes", "no")))
    ev = _script("eval.py", f"--workdir={workdir}", "--max_examples=2", "--few_shot=0", f"--retain={retain}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"{workdir}: checkpoint step 2 (best)" in ev.stdout
    report = json.loads((workdir / "report.json").read_text())
    assert report["meta"]["step"] == 2

    out = tmp_path / "adapter"
    ex = _script("export.py", f"--workdir={workdir}", "--format=peft", f"--out={out}")
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert f"{workdir}: checkpoint step 2 (best)" in ex.stdout and f"exported step 2 of {workdir}" in ex.stdout
    weights = load_file(out / "adapter_model.safetensors")
    assert {float(w.flat[0]) for k, w in weights.items() if "lora_B" in k} == {_b(2)}

    latest = _script("export.py", f"--workdir={workdir}", "--format=peft", f"--out={tmp_path / 'latest'}",
                     "--step=latest")
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert f"exported step 3 of {workdir}" in latest.stdout
    weights = load_file(tmp_path / "latest" / "adapter_model.safetensors")
    assert {float(w.flat[0]) for k, w in weights.items() if "lora_B" in k} == {_b(3)}
