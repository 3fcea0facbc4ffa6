"""What the before / after evaluation reads of a run: its `eval.*` keys, the data it scores, the retain set and the
base model it compares with. The composition step (ftjax.train.compose.eval_settings) fills it from the run config;
`ftjax.evaluation.run.Evaluation` takes it, not the config."""

from __future__ import annotations

import dataclasses
from typing import Any

from ftjax.data.spec import DataSpec


@dataclasses.dataclass(frozen=True)
class EvalKeys:
    """The run's `eval.*` keys (their meanings: ftjax/config.py; `report`: ftjax/evaluation/report_size.py)."""

    every: int
    final: bool
    max_examples: int
    metric: str
    few_shot: int
    report: str
    documents: str | None  # JSONL of {"id", "text"}: the retrieval rows' passages (None: train examples)
    loss_examples: str  # the eval-loss rows' examples: scored | all


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """One run's evaluation: what it scores, on which data, against which base, and what its report names."""

    eval: EvalKeys  # report_size reads `eval.report` and `eval.max_examples` of it
    data: DataSpec  # the eval records, the few-shot source (data.train's first file) and the shots' seed
    retain: str | None  # forget.retain (None: the bundled retain prompts)
    max_new_tokens: int  # forget.max_new_tokens: the base model's replies to the retain prompts
    model_path: str
    model_id: str  # what makes two runs' base models the same (ftjax.evaluation.run.model_id)
    dtypes: dict[str, str]  # the base's dtype, param_dtype and frozen_dtype, as the shared cache keys them
    quant: str | None  # a quantized base as the caches key it ("nf4:targets=..."; None: full precision)
    base_quant: str | None  # the report's words for a quantized base (None: full precision)
    method: str  # the report's names of the run's method and objective
    objective: str
    objective_settings: dict[str, Any]  # the objective's own settings group (e.g. pref.*): keys its cached base rows
    run: dict[str, Any]  # the report's `run` block: steps, lr, batch_size, seq_len, lora_rank
