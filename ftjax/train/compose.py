"""The run composed once: the ConfigDict validated (its `auto` values resolved, once, for the platform of the run's
devices) and read into the parts the training job takes: the model, the method and objective objects, the mesh and
its rules, the data, the optimizer, the schedule, checkpointing, evaluation and forgetting control. The loop, the
data builders, the memory estimate, the AOT compile and the evaluation take these parts, never the ConfigDict."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jax.sharding import Mesh

from ftjax import config as config_lib
from ftjax.data.fingerprint import tokenizer_fingerprint
from ftjax.data.spec import DataSpec
from ftjax.dtypes import frozen_dtype
from ftjax.evaluation.settings import EvalKeys, EvalSettings
from ftjax.interop.quantized_base import FrozenQuant, frozen_quant
from ftjax.methods import Method, method_for
from ftjax.objectives import Objective, TermSpec, objective_for, objective_settings
from ftjax.objectives.reference_cache import pairs_digest
from ftjax.objectives.terms import Term, kl_to_base, l2_to_base_term, router_aux_weight, router_balance
from ftjax.platform import platform_of
from ftjax.provenance import base_identity
from ftjax.sharding import mesh_from_config, parse_rules
from ftjax.workdir import recorded


@dataclasses.dataclass(frozen=True)
class ModelPart:
    """`model.*` and how its frozen part is held (`train.frozen_dtype`, `train.frozen_quant*`), `auto` resolved."""

    path: str
    dtype: str
    param_dtype: str
    remat: str
    attention: str
    frozen_dtype: str
    quant: FrozenQuant | None  # QLoRA's quantized frozen kernels; None: full precision

    @property
    def frozen_cast(self) -> str | None:
        """The dtype the frozen weights are cast to (None: they stay in the parameter dtype)."""
        return frozen_dtype(self.frozen_dtype, self.param_dtype)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many steps of how large a batch, how each is computed and logged."""

    steps: int
    batch_size: int  # global, in rows
    seq_len: int
    grad_accum: int
    log_every: int
    loss_chunk: int
    max_consecutive_skips: int
    early_stop_patience: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Feed:
    """How rows become batches on the host: packed or one example a row, prefetched batches."""

    packing: bool
    prefetch: int
    max_segments: int  # packed rows hold at most this many examples (data.max_segments; 0: no bound)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    every: int
    keep: int
    keep_best: bool  # also keep the checkpoint of the lowest eval loss (with eval data)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """When the held-out metric and the before / after report run."""

    every: int
    final: bool
    has_data: bool  # data.eval is set

    @property
    def reporting(self) -> bool:
        """Task scores, baselines and forgetting metrics run (ftjax.evaluation)."""
        return self.has_data and bool(self.final or self.every)


@dataclasses.dataclass(frozen=True)
class Forgetting:
    """Forgetting control (`forget.*`): KL on the control prompts' replies, L2 to the step-0 weights, replay."""

    kl_weight: float
    l2_weight: float
    replay_fraction: float
    control: str | None  # the control prompts (None: the bundled set)
    max_new_tokens: int
    replay_temperature: float
    replay_samples: int


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run, composed. `config` is the validated ConfigDict, kept only to record it (config.json,
    checkpoint metadata, the resume check) and for the checks that need the model's config (validate_for_model)."""

    config: Any
    model: ModelPart
    method: Method
    objective: Objective
    mesh: Mesh
    rules: dict
    schedule: Schedule
    checkpointing: Checkpointing
    evaluation: EvalPlan
    forget: Forgetting
    optim: Any  # `optim.*` (ftjax.train.optimizer.make_optimizer reads it)
    router_aux_weight: float | None  # moe.router_aux_weight; None: the model's own coefficient
    continued_settings: dict  # ftjax.workdir.CONTINUED_KEYS -> value: what an adapter it continues must share
    feed: Feed
    model_id: str  # what makes two runs' pre-trained models the same (cached replies and baselines)
    data: DataSpec  # `data.*` and the seed: what the objective's data builder reads
    eval_settings: EvalSettings  # what the before / after evaluation reads


def compose(config, devices: Sequence[Any] | None = None, platform: str | None = None) -> Run:
    """Validate `config` (resolving `auto` for `platform`, by default that of `devices` (a TPU slice's abstract
    devices on a CPU host: the TPU values), else this process's: the only place a run does) and read it into
    parts; a mesh that does not fit the devices fails here, before anything is loaded."""
    devices = list(devices) if devices is not None else None
    if platform is None and devices is not None:
        platform = platform_of(devices)
    config_lib.validate(config, platform)
    c = config
    t, m = c.train, c.model
    model = ModelPart(str(m.path), m.dtype, m.param_dtype, m.remat, m.attention, t.frozen_dtype,
                      frozen_quant(t.frozen_quant, t.frozen_quant_scope, c.lora.targets, m.dtype))
    schedule = Schedule(int(t.steps), int(t.batch_size), int(c.data.seq_len), int(t.grad_accum), int(t.log_every),
                        int(t.loss_chunk), int(t.max_consecutive_skips), int(t.early_stop_patience), int(c.seed))
    f = c.forget
    return Run(config=config, model=model, method=method_for(c.method, c.lora),
               objective=objective_for(c.objective, c[objective_settings(c.objective)]),
               mesh=mesh_from_config(c.mesh, devices=devices), rules=parse_rules(c.mesh.rules), schedule=schedule,
               checkpointing=Checkpointing(int(c.checkpoint.every), int(c.checkpoint.keep),
                                           bool(c.checkpoint.keep_best)),
               evaluation=EvalPlan(int(c.eval.every), bool(c.eval.final), bool(c.data.eval)),
               forget=Forgetting(float(f.kl_weight), float(f.l2_weight), float(f.replay_fraction), f.control,
                                 int(f.max_new_tokens), float(f.replay_temperature), int(f.replay_samples)),
               optim=c.optim, router_aux_weight=c.moe.router_aux_weight, continued_settings=recorded(c).settings,
               feed=Feed(bool(c.data.packing), int(c.data.prefetch), int(c.data.max_segments)), model_id=model_id(c),
               data=data_spec(c), eval_settings=eval_settings(c))


def data_spec(config) -> DataSpec:
    """The run's `data.*` keys and seed, as the data builders read them."""
    return DataSpec(**{key: config.data[key] for key in DataSpec.keys()}, seed=int(config.seed))


def model_id(config) -> str:
    """What makes two runs' base models the same (the key of cached base replies and baselines): a quantized
    base (train.frozen_quant) is another base."""
    c = config
    quant = "" if c.train.frozen_quant == "none" else f"|{c.train.frozen_quant}:{_quant_scope(c)}"
    return f"{c.model.path}|{c.model.dtype}|{c.model.param_dtype}|{c.train.frozen_dtype}{quant}"


def _quant_scope(config) -> str:
    """The kernels a quantized base covers: every linear, or the LoRA targets (then they are part of it)."""
    return "all_linears" if config.train.frozen_quant_scope == "all_linears" else f"targets={config.lora.targets}"


def eval_settings(config) -> EvalSettings:
    """What the before / after evaluation reads of the run (its eval.*, data, retain set, base and report names).
    scripts/eval.py builds it for a recorded run with its overrides."""
    c, e, t = config, config.eval, config.train
    quant = None if t.frozen_quant == "none" else f"{t.frozen_quant}:{_quant_scope(c)}"
    where = ("every linear but the head" if t.frozen_quant_scope == "all_linears"
             else f"the LoRA targets {c.lora.targets}")
    return EvalSettings(
        eval=EvalKeys(int(e.every), bool(e.final), int(e.max_examples), str(e.metric), int(e.few_shot), str(e.report),
                     e.documents, str(e.loss_examples)),
        data=data_spec(c), retain=c.forget.retain, max_new_tokens=int(c.forget.max_new_tokens),
        model_path=str(c.model.path), model_id=model_id(c),
        dtypes={"dtype": c.model.dtype, "param_dtype": c.model.param_dtype, "frozen_dtype": t.frozen_dtype},
        quant=quant, base_quant=None if quant is None else f"{t.frozen_quant} on {where}",
        method=c.method, objective=c.objective, objective_settings=c[objective_settings(c.objective)].to_dict(),
        run={"steps": t.steps, "lr": c.optim.lr, "batch_size": t.batch_size, "seq_len": c.data.seq_len,
             "lora_rank": (method_for(c.method, c.lora).describe() or {}).get("rank")})


def row_segments(run: Run) -> int:
    """The most segments a training row of this run holds (0: no bound): one example a row unpacked (a preference
    pair is two), else data.max_segments, which the packers keep to; the model's attention kernel counts on it."""
    return run.objective.segments_per_example if not run.feed.packing else run.feed.max_segments


def objective_terms(run: Run) -> list[Term]:
    """The objective's own terms, reading the reference the method makes available."""
    reference = run.objective.reference(start_copy_is_free=not run.method.keeps_start_copy)
    return list(run.objective.terms(TermSpec(run.schedule.loss_chunk, run.schedule.seq_len, reference)))


def loss_terms(run: Run, model_cfg: Any = None, extra: Sequence[Term] = (), own: Sequence[Term] | None = None
               ) -> list[Term]:
    """The run's loss: the objective's terms (`own`, default `objective_terms`), then forgetting control's when
    weighted, then a mixture-of-experts model's (`model_cfg`) router balance loss, then `extra` (terms handed to
    `run`)."""
    s, f = run.schedule, run.forget
    terms = list(objective_terms(run) if own is None else own)
    terms += [kl_to_base(f.kl_weight, s.loss_chunk)] if f.kl_weight else []
    terms += [l2_to_base_term(f.l2_weight)] if f.l2_weight else []
    aux = router_aux_weight(run.router_aux_weight, model_cfg)
    terms += [router_balance(aux, model_cfg.moe.top_k, s.grad_accum)] if aux else []
    return terms + list(extra)


def reference_identity(run: Run, tokenizer: Any, data: Any) -> dict[str, Any]:
    """What cached reference log-probs depend on (`ftjax.objectives.reference_cache`); any change makes the cache
    invalid."""
    m = run.model
    return {"base": base_identity(m.path),
            "dtypes": {"model.dtype": m.dtype, "model.param_dtype": m.param_dtype,
                       "train.frozen_dtype": str(m.frozen_cast)},
            "data": {"train": pairs_digest(data.train), "eval": pairs_digest(data.eval)},
            "template": tokenizer_fingerprint(tokenizer),
            "data.seq_len": int(run.data.seq_len), "data.overlong": str(run.data.overlong)}
