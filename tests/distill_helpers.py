"""Distillation runs on the tiny config: the config, a step's inputs, a tiny HF teacher folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ftjax import config as config_lib
from ftjax.api import load_tokenizer
from ftjax.config import DEFAULT_MODEL
from ftjax.train.compose import compose
from ftjax.train.setup import build_state
from loop_helpers import load_config


def distill_config(**settings):
    """configs/tiny_test.py under objective=distill, context distillation from its 1-shot prompt by default."""
    c = load_config()
    c.objective = "distill"
    c.distill.teacher_prefix = "kshot"
    c.data.packing = False
    c.eval.final = False
    for key, value in settings.items():
        group, name = key.split("__")
        c[group][name] = value
    return c


def step_inputs(c, devices=None):
    """(run, setup, data, host batch of the first train rows) for `c` on `devices` (default: the config's mesh)."""
    config_lib.validate(c)
    run = compose(c, devices)
    setup = build_state(run)
    data = run.objective.read_data(run, load_tokenizer(c.model.path), setup.model_config.vocab_size)
    return run, setup, data, data.train.batch(np.arange(c.train.batch_size))


def tiny_hf_teacher(folder: Path) -> Path:
    """A random transformers Llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer: a teacher of its own."""
    from hf_helpers import save, tiny_hf

    model = tiny_hf("llama", seed=3, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    save(model, folder)
    load_tokenizer(DEFAULT_MODEL).save_pretrained(str(folder))
    return folder
