"""A method declared here, not in ftjax/: LoRA on o_proj only, with a FLOP formula of its own. Registered by
name and trained on configs/tiny_test.py, it alone decides what trains, what the checkpoint holds, what a PEFT
export writes and the FLOPs behind the logged MFU."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.interop.peft import export_peft
from ftjax.methods import Lora, register_method
from ftjax.train.loop import run
from ftjax.workdir import load_trained
from loop_helpers import load_config, metrics

NAME = "lora_o_proj"
FLOPS = 123456.0  # per token: the toy's own formula, a constant


class OProjLora(Lora):
    """LoRA whatever lora.targets says: on the attention output projection only."""

    name = NAME
    flop_formula = f"{FLOPS:g} per token"

    def __init__(self, spec):
        super().__init__(dataclasses.replace(spec, targets="o_proj"))

    def flops_per_token(self, model_cfg, seq_len, trainable) -> float:
        return FLOPS


@pytest.mark.slow  # a training run (> 10 s here)
def test_a_method_declared_in_a_test_decides_trainables_checkpoint_export_and_flops(tmp_path, capsys):
    register_method(NAME, OProjLora)
    c = load_config()
    c.method, c.lora.targets = NAME, "q_proj,v_proj"  # the method overrides the targets
    c.train.steps, c.eval.final, c.checkpoint.every = 2, False, 0
    result = run(c, tmp_path / "run")
    out = capsys.readouterr().out

    trained = load_trained(tmp_path / "run", "latest")  # rebuilt by the registered method from config.json
    adapters = nnx.to_flat_state(nnx.state(trained.model, nnx.LoRAParam))
    paths = {".".join(map(str, path[:-2])) for path, _ in adapters}  # e.g. layers.self_attn.o_proj (stacked)
    cfg = trained.model.config
    assert paths and all(p.endswith("o_proj") for p in paths)
    per_layer = c.lora.rank * (cfg.num_heads * cfg.head_dim + cfg.hidden_size)  # A [in, r] + B [r, out]
    assert f"{NAME}: {cfg.num_layers * per_layer:,} trainable parameters" in out
    assert sum(int(np.prod(v.get_value().shape)) for _, v in adapters) == cfg.num_layers * per_layer
    assert any(np.abs(np.asarray(v.get_value())).max() > 0 for path, v in adapters if path[-1] == "lora_b")  # B starts at 0

    adapter = export_peft(trained.model, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == ["o_proj"]

    last = metrics(tmp_path / "run")[-1]
    want = last["tokens_per_s"] * FLOPS / (result["peak_flops"] * jax.device_count())
    assert last["mfu"] == pytest.approx(want, rel=1e-9)
