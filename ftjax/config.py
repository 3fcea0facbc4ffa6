"""Defaults and validation of the run config; every key has a typed default so it can be set by flag."""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from ftjax.backend_defaults import resolve_auto
from ftjax.errors import ConfigError
from ftjax.scorer_names import check_metric
from ftjax.sharding import parse_rules

DEFAULT_MODEL = "smollm2-135m-instruct"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def recipe_module(path: str | os.PathLike) -> Any:
    """A recipe file (configs/NAME.py) as a module: configs/ is a folder of files, not a package."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The get_config() of a recipe file (configs/NAME.py): recipes build on each other and tests load them by
    path."""
    return recipe_module(path).get_config()


def default_config() -> ml_collections.ConfigDict:
    """The full set of keys a recipe may override (grouped as in ARCHITECTURE.md)."""
    c = ml_collections.ConfigDict()
    c.method = "lora"  # lora | full
    c.seed = 0
    c.model = dict(
        path=DEFAULT_MODEL,
        # auto: per backend (ftjax/backend_defaults.py): CPU float32 / minimal / xla, GPU bfloat16 / none / cudnn,
        # TPU bfloat16 / minimal / splash
        dtype="auto",  # compute dtype: auto | float32 | bfloat16 | float16
        param_dtype="float32",
        remat="auto",  # auto | minimal (save projection outputs, recompute the rest) | none | full | dots
        attention="auto",  # auto | xla | cudnn | pallas_gpu | splash
    )
    c.objective = "sft"  # sft | dpo | ipo | orpo | simpo (preference data: ftjax/data/preference.py) | grpo | distill
    c.pref = dict(
        beta=0.1,  # DPO / IPO / ORPO / SimPO temperature (TRL's beta)
        label_smoothing=0.0,  # robust DPO (TRL loss_type="robust") and SimPO: label noise eps in [0, 0.5)
        gamma=0.5,  # SimPO's target reward margin
        sft_weight=0.0,  # weight of a cross-entropy term on the chosen reply (ORPO has its own built in)
    )
    # objective=grpo: RL from the model's own samples (ftjax/objectives/grpo.py); names as TRL's GRPOConfig
    c.rl = dict(
        num_generations=8,  # G: completions sampled per prompt (a group)
        prompts_per_step=4,  # P: prompts per rollout batch (P*G completions packed into train.batch_size rows)
        max_new_tokens=64,  # per completion; generation stops earlier at EOS, row by row
        temperature=1.0,
        top_p=1.0,
        loss_type="dapo",  # grpo | dr_grpo | dapo | bnpo | cispo | rloo (ftjax/objectives/grpo_loss.py)
        epsilon=0.2,  # clip: ratio >= 1 - epsilon
        epsilon_high=config_dict.placeholder(float),  # ratio <= 1 + epsilon_high; unset: epsilon
        beta=0.0,  # weight of the k3 KL to the reference (adapters off under LoRA, a frozen copy for full); 0: none
        num_iterations=1,  # mu: optimizer steps on each rollout batch (> 1: its sampling-time log-probs are pi_old)
        rewards="json_fields",  # name or name=weight, comma-separated: bundled or package.module:function
        baseline="group",  # group (GRPO's group mean / std) | rloo (leave-one-out, RLOOTrainer)
        scale_rewards="group",  # group | batch | none: what a group-baseline advantage is divided by
        dynamic_sampling=False,  # DAPO: drop groups whose rewards are all equal and draw again
        max_draws=4,  # dynamic sampling's draws per step before it keeps uninformative groups
    )
    # objective=distill (ftjax/objectives/distill.py): the student learns the teacher's next-token distribution on
    # the train prompts' replies
    c.distill = dict(
        # a model ftjax loads (HF folder, .gguf, workdir, known name), or self: the student's own base model with
        # teacher_prefix before each prompt (context distillation; under LoRA its adapters off, no second copy)
        teacher="self",
        # what only the teacher sees before the prompt: kshot (the report's fixed eval.few_shot examples as earlier
        # turns), retrieval (eval.few_shot most similar other train examples, BM25), system:<text>, or empty
        teacher_prefix="kshot",
        loss="forward_kl",  # forward_kl (KL(teacher || student)) | reverse_kl | jsd (TRL GKD's generalized JSD)
        beta=0.5,  # jsd's interpolation: 0 = forward KL, 1 = reverse KL
        temperature=1.0,  # softmax temperature of both distributions, and of the student's on-policy samples
        lambda_=0.0,  # on-policy fraction: batches whose replies the student samples and the teacher scores (GKD)
        max_new_tokens=64,  # length bound of an on-policy reply
    )
    # router_aux_weight: weight of a mixture-of-experts model's router balance loss (ftjax/objectives/terms.py); unset =
    # the model's own router_aux_loss_coef (its HF config.json; transformers adds it only with output_router_logits),
    # 0 = off
    c.moe = dict(router_aux_weight=config_dict.placeholder(float))
    c.lora = dict(rank=16, alpha=32.0, dropout=0.0, targets=LORA_TARGETS, rslora=False)
    c.data = dict(
        train=config_dict.placeholder(str),
        eval=config_dict.placeholder(str),
        seq_len=512,
        packing=True,
        # packed rows hold at most this many examples (pair halves for preference data); 0 = no bound. cuDNN's
        # packed layout (the GPU default) reserves a slot per segment; a row of shorter examples starts a new row
        max_segments=32,
        overlong="drop",  # drop | truncate | error
        # data.train: "a.jsonl" or a mixture "a.jsonl:0.7,b.jsonl:0.3" (relative weights; see ftjax/data/mixture.py)
        eval_fraction=0.0,  # with data.eval empty: fraction of each train source held out for eval (by seed)
        on_bad_record="error",  # error | skip (missing fields, wrong role order, empty assistant content)
        max_dropped_fraction=0.1,  # stop when more than this fraction of records is dropped (any reason)
        loss_on="assistant",  # assistant | all | last_assistant
        messages_field="messages",
        prompt_field="prompt",
        completion_field="completion",
        text_field="text",
        tfds_name=config_dict.placeholder(str),  # a prepared TFDS dataset instead of data.train files
        tfds_data_dir=config_dict.placeholder(str),
        tfds_split="train",
        tfds_eval_split=config_dict.placeholder(str),
        cache_dir=config_dict.placeholder(str),  # on-disk token cache (keyed by content fingerprints)
        prefetch=4,  # batches prepared ahead in a background thread; 0 = none
    )
    c.train = dict(
        batch_size=8,  # global, in sequences
        steps=100,
        grad_accum=1,
        log_every=10,
        frozen_dtype="auto",  # auto | float32 | bfloat16 | float16: dtype of the frozen (non-trained) weights
        max_consecutive_skips=5,  # stop after this many steps in a row with NaN/Inf gradients
        loss_chunk=512,  # tokens per sequence chunk of the cross-entropy (bounds fp32 logits memory)
        early_stop_patience=0,  # stop after this many evals (eval.every) without a lower eval loss; 0 = never
        # QLoRA (method=lora): the frozen kernels held quantized, dequantized a layer at a time in the step:
        # none | int8 (absmax per output channel) | nf4 (bitsandbytes' NF4, double-quantized) | gguf (a .gguf
        # model.path's own blocks, as shipped)
        frozen_quant="none",
        frozen_quant_scope="lora_targets",  # lora_targets | all_linears (every linear but the output head)
    )
    c.optim = dict(
        name="adamw",  # adamw | sgd | adafactor | lion
        lr=1e-4,
        schedule="cosine",  # cosine | linear | constant
        warmup_steps=0,
        weight_decay=0.0,  # decoupled; never applied to norm scales and biases
        clip_norm=1.0,  # global-norm clipping; 0 disables
        min_lr_ratio=0.0,  # final lr / peak lr for cosine and linear decay
        b1=0.9,  # adamw, lion
        b2=0.999,  # adamw, lion
        eps=1e-8,  # adamw
        momentum=0.9,  # sgd; 0 = plain SGD
    )
    # rules: overrides of the logical-axis -> mesh-axis table (ftjax/sharding.py RULES), e.g.
    # "embed=tensor,mlp=fsdp" or "batch=data+fsdp,length=" (nothing or none = replicated).
    # expert: devices a mixture-of-experts layer's experts are split over (expert parallelism; tokens split over
    # it too, as over data and fsdp); must divide the model's expert count; 1 for dense models
    c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, rules="")
    # keep: the latest N checkpoints; keep_best: with eval data, also the one with the lowest eval loss
    c.checkpoint = dict(every=0, keep=2, keep_best=True)
    c.eval = dict(
        every=0,
        # the report after the last step; with no periodic eval its fine-tuned eval loss is the last step's eval_loss
        final=True,
        max_examples=200,
        # scores of greedy replies on the eval split, comma-separated: exact | json_valid | contains | regex |
        # regex:PATTERN (last) | a task scorer such as person_json (see ftjax/scorer_names.py)
        metric="exact",
        # k: train examples as prior chat turns for the prompted baseline (the same k for every question), and what
        # the retrieval rows retrieve per question (the k most similar by BM25); 0 = neither row
        few_shot=3,
        # JSONL of {"id", "text"} documents: the retrieval rows put the k (eval.few_shot) passages most similar to
        # each question into its prompt (RAG); empty = they retrieve the k most similar train examples instead
        documents=config_dict.placeholder(str),
        # the after-training report's size: full | quick (20 eval examples, eval loss on those) | none
        report="full",
        # the eval-loss rows' examples: scored (the task rows' max_examples, each model on the same ones) | all
        # (every eval record, as the training loop's eval loss; several times the report's scoring cost)
        loss_examples="scored",
    )
    c.forget = dict(
        retain=config_dict.placeholder(str),  # retain-set JSONL forgetting is measured on; empty = bundled prompts
        # prompts (JSONL, same format) that replay and the KL term train on; empty = the bundled control set,
        # disjoint from the bundled retain set (forgetting measured out of sample). Give forget.retain's own
        # path to replay the user's replies there (then the figures are in-sample).
        control=config_dict.placeholder(str),
        max_new_tokens=64,  # length of the base model's replies to the retain prompts
        replay_fraction=0.0,  # fraction of training examples drawn from the control prompts + their replies
        # replay replies are the base model's samples at this temperature (1.0: training on them minimises
        # KL(base || tuned) in expectation); 0 = its greedy reply, the mode only
        replay_temperature=1.0,
        replay_samples=4,  # sampled replies per control prompt (1 with temperature 0)
        kl_weight=0.0,  # weight of KL(base || tuned) on batches of control prompts + base replies, added to the loss
        l2_weight=0.0,  # weight of sum ||W - W_base||^2 (method=full only)
    )
    c.lock()
    return c


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys as dotted paths."""
    out = []
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def unknown_key_message(c: ml_collections.ConfigDict, key: str) -> str:
    """One line naming the closest valid key to a misspelled one."""
    near = difflib.get_close_matches(key, flat_keys(c), n=1, cutoff=0.0)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"unknown config key '{key}'{hint}"


DTYPES = ("float32", "bfloat16", "float16")

# Every key of default_config() has its check here, in exactly one of _CHOICES, _RANGES and _FREE
# (tests/test_configs.py holds the tables to that); `validate` also checks the keys that depend on each other.
_CHOICES = {
    "method": ("lora", "full"),
    "objective": ("sft", "dpo", "ipo", "orpo", "simpo", "grpo", "distill"),
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": ("minimal", "none", "full", "dots"),
    "model.attention": ("xla", "cudnn", "pallas_gpu", "splash"),
    "data.overlong": ("drop", "truncate", "error"),
    "data.on_bad_record": ("error", "skip"),
    "data.loss_on": ("assistant", "all", "last_assistant"),
    "optim.name": ("adamw", "sgd", "adafactor", "lion"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.frozen_dtype": DTYPES,
    "train.frozen_quant": ("none", "int8", "nf4", "gguf"),
    "train.frozen_quant_scope": ("lora_targets", "all_linears"),
    "eval.report": ("full", "quick", "none"),  # ftjax/evaluation/report_size.py
    "rl.loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "rloo"),
    "rl.baseline": ("group", "rloo"),
    "rl.scale_rewards": ("group", "batch", "none"),
    "eval.loss_examples": ("scored", "all"),
    "distill.loss": ("forward_kl", "reverse_kl", "jsd"),  # ftjax/objectives/distill_loss.py
}

_AT_LEAST_1 = (lambda v: v >= 1, "be >= 1")
_AT_LEAST_0 = (lambda v: v >= 0, "be >= 0")
_POSITIVE = (lambda v: v > 0, "be > 0")
_FRACTION = (lambda v: 0.0 <= v < 1.0, "be in [0, 1)")
_CLOSED_FRACTION = (lambda v: 0.0 <= v <= 1.0, "be in [0, 1]")
_MESH_AXIS = (lambda v: v == -1 or v >= 1, "be >= 1, or -1 for the devices the other axes leave")

_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora.rank": _AT_LEAST_1,
    "lora.alpha": _POSITIVE,
    "lora.dropout": _FRACTION,
    "data.seq_len": _AT_LEAST_1,
    "data.eval_fraction": _FRACTION,
    "data.max_dropped_fraction": _CLOSED_FRACTION,
    "data.prefetch": _AT_LEAST_0,
    "data.max_segments": (lambda v: v == 0 or v >= 2, "be 0 (no bound) or >= 2"),
    "train.batch_size": _AT_LEAST_1,
    "train.steps": _AT_LEAST_1,
    "train.grad_accum": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.max_consecutive_skips": _AT_LEAST_1,
    "train.loss_chunk": _AT_LEAST_1,
    "train.early_stop_patience": _AT_LEAST_0,
    "optim.lr": _POSITIVE,
    "optim.warmup_steps": _AT_LEAST_0,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.clip_norm": (lambda v: v >= 0, "be >= 0 (0 disables clipping)"),
    "optim.min_lr_ratio": _CLOSED_FRACTION,
    "optim.b1": _FRACTION,
    "optim.b2": _FRACTION,
    "optim.eps": _POSITIVE,
    "optim.momentum": _FRACTION,
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "mesh.expert": _AT_LEAST_1,
    "checkpoint.every": _AT_LEAST_0,
    "checkpoint.keep": _AT_LEAST_1,
    "eval.every": _AT_LEAST_0,
    "eval.max_examples": _AT_LEAST_1,
    "eval.few_shot": _AT_LEAST_0,
    "forget.max_new_tokens": _AT_LEAST_1,
    "forget.replay_fraction": _FRACTION,
    "forget.replay_temperature": _AT_LEAST_0,
    "forget.replay_samples": _AT_LEAST_1,
    "forget.kl_weight": _AT_LEAST_0,
    "forget.l2_weight": _AT_LEAST_0,
    "pref.beta": _POSITIVE,
    "pref.label_smoothing": (lambda v: 0.0 <= v < 0.5, "be in [0, 0.5)"),
    "pref.gamma": _AT_LEAST_0,
    "pref.sft_weight": _AT_LEAST_0,
    "rl.num_generations": (lambda v: v >= 2, "be >= 2 (a group's rewards are compared with each other)"),
    "rl.prompts_per_step": _AT_LEAST_1,
    "rl.max_new_tokens": _AT_LEAST_1,
    "rl.temperature": _POSITIVE,
    "rl.top_p": (lambda v: 0.0 < v <= 1.0, "be in (0, 1]"),
    "rl.epsilon": _AT_LEAST_0,
    "rl.epsilon_high": (lambda v: v is None or v >= 0, "be >= 0, or unset for rl.epsilon"),
    "rl.beta": _AT_LEAST_0,
    "rl.num_iterations": _AT_LEAST_1,
    "rl.max_draws": _AT_LEAST_1,
    "distill.beta": _CLOSED_FRACTION,
    "distill.temperature": _POSITIVE,
    "distill.lambda_": _CLOSED_FRACTION,
    "distill.max_new_tokens": _AT_LEAST_1,
    "moe.router_aux_weight": (lambda v: v is None or v >= 0, "be >= 0 (0: off), or unset for the model's own"),
}

# Any value of the key's type (the locked ConfigDict checks types): paths and names, checked where they are
# read (a missing file names itself there), and switches.
_FREE = ("seed", "model.path", "lora.targets", "lora.rslora", "data.train", "data.eval", "data.packing",
         "data.messages_field", "data.prompt_field", "data.completion_field", "data.text_field", "data.tfds_name",
         "data.tfds_data_dir", "data.tfds_split", "data.tfds_eval_split", "data.cache_dir", "checkpoint.keep_best",
         "eval.final", "eval.documents", "forget.retain", "forget.control", "rl.rewards", "rl.dynamic_sampling",
         "distill.teacher")
# eval.metric: its scorer names (ftjax.scorer_names.check_metric); mesh.rules: ftjax.sharding.parse_rules;
# distill.teacher_prefix: _check_distill.
CHECKED_KEYS = (*_CHOICES, *_RANGES, *_FREE, "eval.metric", "mesh.rules", "distill.teacher_prefix")
AUTO_KEYS = ("model.dtype", "model.remat", "model.attention", "train.frozen_dtype")  # resolved per backend


# Keys that apply with some methods or objectives only: key (when set) -> (the key it depends on, whether it
# applies with that key's value, the message's rest: {value} the key's, {other} the other key's).
_APPLIES_ONLY: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "train.frozen_quant": ("method", lambda v: v == "lora", "={value} quantizes the frozen base of a LoRA run; "
                           "method=full trains every weight (use frozen_quant=none)"),
    "forget.l2_weight": ("method", lambda v: v == "full", " applies to method=full (W - W_base); with LoRA use "
                         "forget.kl_weight or forget.replay_fraction"),
    "pref.sft_weight": ("objective", lambda v: v != "orpo", " does not apply to objective=orpo: its NLL term on the "
                        "chosen reply is built in"),
    "pref.label_smoothing": ("objective", lambda v: v in ("dpo", "simpo"), " applies to objective=dpo (robust DPO) "
                             "or simpo, not {other}"),
    "forget.replay_fraction": ("objective", lambda v: v not in ("dpo", "ipo", "orpo", "simpo"), " mixes SFT examples "
                               "into the data; objective={other} trains on preference pairs (use forget.kl_weight)"),
    "distill.lambda_": ("objective", lambda v: v == "distill", " is objective=distill's on-policy fraction, not "
                        "objective={other}'s"),
}

TEACHER_PREFIXES = ("kshot", "retrieval", "system:<text>", "")


def _check_distill(c: ml_collections.ConfigDict) -> None:
    """distill.teacher_prefix's form, and what it and distill.lambda_ need of the other keys."""
    d = c.distill
    prefix = str(d.teacher_prefix)
    if prefix not in ("kshot", "retrieval", "") and not (prefix.startswith("system:") and prefix[7:].strip()):
        raise ConfigError(choice_message("distill.teacher_prefix", prefix, TEACHER_PREFIXES))
    if c.objective != "distill":
        return
    if str(d.teacher) == "self" and not prefix:
        raise ConfigError("config.distill.teacher=self needs a distill.teacher_prefix (kshot, retrieval or "
                          "system:<text>): without one the teacher is the student itself")
    if prefix in ("kshot", "retrieval") and c.eval.few_shot < 1:
        raise ConfigError(f"config.distill.teacher_prefix={prefix} puts eval.few_shot examples before each prompt; "
                          "set eval.few_shot >= 1")
    if d.lambda_ > 0 and c.data.packing:
        raise ConfigError(f"config.distill.lambda_={d.lambda_} samples replies of its own length for each example: "
                          "it needs one example a row (data.packing=false)")


def choice_message(key: str, value: Any, choices: tuple) -> str:
    """One line for a value outside its choices, naming the closest one."""
    near = difflib.get_close_matches(str(value), [str(x) for x in choices], n=1, cutoff=0.0)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"config.{key}={value!r} is not one of {', '.join(map(str, choices))}{hint}"


def allow_choice(key: str, value: str) -> None:
    """Accept one more value of a choice key (`method` / `objective`: what the registries add)."""
    if value not in _CHOICES[key]:
        _CHOICES[key] = (*_CHOICES[key], value)


def get(c: ml_collections.ConfigDict, key: str):
    """Value at a dotted key, or ConfigError naming the closest valid key."""
    node = c
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(unknown_key_message(c, key))
        node = node[part]
    return node


def validate_for_model(c: ml_collections.ConfigDict, model_cfg) -> None:
    """The keys that depend on the model (its ModelConfig), checked once its config is read, before loading."""
    if c.moe.router_aux_weight and model_cfg.moe is None:
        raise ConfigError(f"config.moe.router_aux_weight={c.moe.router_aux_weight} weights a mixture-of-experts "
                          f"router's balance loss, but {c.model.path} is dense")
    if c.mesh.expert == 1:
        return
    if model_cfg.moe is None:
        raise ConfigError(f"config.mesh.expert={c.mesh.expert} splits the experts of a mixture-of-experts model, "
                          f"but {c.model.path} is dense; use mesh.data or mesh.fsdp")
    if model_cfg.moe.num_experts % c.mesh.expert:
        raise ConfigError(f"config.mesh.expert={c.mesh.expert} does not divide the model's "
                          f"{model_cfg.moe.num_experts} experts")


def validate(c: ml_collections.ConfigDict, platform: str | None = None) -> ml_collections.ConfigDict:
    """Resolve `auto` values for `platform` (default: this process's backend), then check every key's choices and
    range, then the keys that depend on each other, before anything is compiled; the first problem as one line."""
    resolve_auto(c, platform)
    for key, choices in _CHOICES.items():
        value = get(c, key)
        if value not in choices:
            raise ConfigError(choice_message(key, value, (("auto",) if key in AUTO_KEYS else ()) + tuple(choices)))
    for key, (ok, want) in _RANGES.items():
        if not ok(get(c, key)):
            raise ConfigError(f"config.{key} must {want}, got {get(c, key)}")
    check_metric(c.eval.metric)  # ConfigError naming the unknown metric
    parse_rules(c.mesh.rules)  # ConfigError naming a bad logical axis or mesh axis
    if c.train.early_stop_patience and not (c.eval.every and c.data.eval):
        raise ConfigError("config.train.early_stop_patience needs periodic eval losses: set eval.every and data.eval")
    if c.eval.documents and not (c.data.eval and c.eval.few_shot):
        raise ConfigError("config.eval.documents is retrieved from for the eval questions' prompts: it needs "
                          "data.eval and eval.few_shot >= 1 (the passages per question)")
    if c.train.batch_size % c.train.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={c.train.batch_size} is not divisible by "
            f"config.train.grad_accum={c.train.grad_accum}"
        )
    if c.forget.replay_temperature == 0 and c.forget.replay_samples > 1:
        raise ConfigError("config.forget.replay_samples > 1 needs forget.replay_temperature > 0: greedy replies "
                          f"are all the same (got replay_samples={c.forget.replay_samples})")
    for key, (other, applies, message) in _APPLIES_ONLY.items():
        if get(c, key) not in (0, "none") and not applies(get(c, other)):
            raise ConfigError("config." + key + message.format(value=get(c, key), other=get(c, other)))
    _check_distill(c)
    if c.train.frozen_quant == "gguf" and not (str(c.model.path).endswith(".gguf") or c.model.path == DEFAULT_MODEL):
        raise ConfigError(f"config.train.frozen_quant=gguf keeps a .gguf file's own blocks, but model.path="
                          f"{c.model.path} is not one; use frozen_quant=nf4 or int8")
    return c
