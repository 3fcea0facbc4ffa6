"""An objective declared here, not in ftjax/: SFT whose tokens weigh more the later they come in their segment,
a weight it computes itself. Registered by name, it trains on configs/tiny_test.py end to end: its data, its
batch source, its loss term, its held-out metric and its row in the report, each checked against numpy."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import data as data_lib
from ftjax.objectives import Objective, ReportRows, register_objective
from ftjax.objectives.sources import DatasetBatches
from ftjax.objectives.terms import BatchTerm, cross_entropy_of
from ftjax.train.loop import run
from loop_helpers import load_config, metrics

NAME = "sft_late_tokens"
KEY = "late_tokens"
TOL = 1e-4  # a whole model, fp32 on CPU


def token_weights(batch) -> jnp.ndarray:
    """The loss weight times 1 + position / 128: a reply's later tokens count up to twice as much."""
    return batch["loss_weights"] * (1.0 + batch["positions"].astype(jnp.float32) / 128.0)


def weighted_ce(model, batches) -> float:
    """Σ token_weights · CE / Σ token_weights over `batches`, from the model's logits in numpy (float64)."""
    total = weight = 0.0
    for b in batches:
        b = {k: np.asarray(v) for k, v in b.items()}
        logits = np.asarray(model(b["input_ids"], b["positions"], b["segment_ids"]), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        w = np.asarray(token_weights(b), np.float64)
        total, weight = total + (w * nll).sum(), weight + w.sum()
    return float(total / weight)


class Recorded(DatasetBatches):
    """The dataset's batches, the first one kept on the host."""

    first = None

    def next(self, trainable):
        batch = super().next(trainable)
        if Recorded.first is None:
            Recorded.first = {k: np.asarray(v) for k, v in batch.items()}
        return batch


class LateTokenSft(Objective):
    name = NAME

    def __init__(self, pref):
        self.eval_batch_size = None

    def read_data(self, run, tokenizer, vocab_size, replay=None):
        return data_lib.build_datasets(run.data, tokenizer, vocab_size=vocab_size, replay=replay)

    def batches(self, train, batch_size, seed, sharding, prefetch):
        return Recorded(data_lib.train_iterator(train, batch_size, seed=seed, sharding=sharding, prefetch=prefetch))

    def terms(self, spec):
        fn = cross_entropy_of(token_weights, spec.loss_chunk)
        return [BatchTerm("loss", fn, normalizer=lambda batch: jnp.sum(token_weights(batch)))]

    def report_rows(self, eval_rows, batch_size, loss_chunk):
        def measure(model):
            return {"weighted_ce": weighted_ce(model, data_lib.eval_iterator(eval_rows, batch_size))}

        def table(section):
            return [["late-token weighted CE", f"{section['base']['weighted_ce']:.4f}",
                     f"{section['finetuned']['weighted_ce']:.4f}"]]

        return ReportRows(KEY, measure, table, "late-token weighted CE on the eval rows",
                          lambda measured: {"late_ce": measured["weighted_ce"]})


@pytest.mark.slow  # a training run with its report (> 10 s here)
def test_an_objective_declared_in_a_test_trains_end_to_end(tmp_path):
    register_objective(NAME, LateTokenSft)
    c = load_config()
    c.objective = NAME
    c.train.steps, c.checkpoint.every = 3, 0
    result = run(c, tmp_path)
    logged = metrics(tmp_path)

    # its batches and its term: the first step's loss is its weighted CE of the pre-trained model (zero adapters)
    pretrained = ftjax.load_model(c.model.path, dtype=c.model.dtype)
    assert logged[0]["step"] == 1
    assert logged[0]["loss"] == pytest.approx(weighted_ce(pretrained, [Recorded.first]), rel=TOL)

    # its held-out metric (its term on the eval rows, as the step reads it) and its report row (its own numpy)
    report = json.loads((tmp_path / "report.json").read_text())
    eval_loss = [r["eval_loss"] for r in logged if "eval_loss" in r]
    assert len(eval_loss) == 1 and result["step"] == 3
    assert report[KEY]["finetuned"]["weighted_ce"] == pytest.approx(eval_loss[0], rel=TOL)
    assert report[KEY]["base"]["weighted_ce"] > report[KEY]["finetuned"]["weighted_ce"]
    assert report["held_out"]["key"] == KEY and "task" in report and report["task"]["finetuned"]
    assert "late-token weighted CE" in (tmp_path / "report.md").read_text()
