"""Defaults and validation of the run config; every key has a typed default so it can be set by flag."""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections import config_dict

from ftjax.errors import ConfigError
from ftjax.scorer_names import check_metric

DEFAULT_MODEL = "smollm2-135m-instruct"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def default_config() -> ml_collections.ConfigDict:
    """The full set of keys a recipe may override (grouped as in DESIGN.md)."""
    c = ml_collections.ConfigDict()
    c.method = "lora"  # lora | full
    c.seed = 0
    c.model = dict(
        path=DEFAULT_MODEL,
        dtype="float32",  # compute dtype
        param_dtype="float32",
        remat="minimal",  # minimal (save projection outputs, recompute the rest) | none | full | dots
        attention="xla",  # xla | cudnn
    )
    c.lora = dict(rank=16, alpha=32.0, dropout=0.0, targets=LORA_TARGETS, rslora=False)
    c.data = dict(
        train=config_dict.placeholder(str),
        eval=config_dict.placeholder(str),
        seq_len=512,
        packing=True,
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
        frozen_dtype="float32",  # float32 | bfloat16 | float16: dtype of the frozen (non-trained) weights
        max_consecutive_skips=5,  # stop after this many steps in a row with NaN/Inf gradients
        loss_chunk=512,  # tokens per sequence chunk of the cross-entropy (bounds fp32 logits memory)
        early_stop_patience=0,  # stop after this many evals (eval.every) without a lower eval loss; 0 = never
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
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # keep: the latest N checkpoints; keep_best: with eval data, also the one with the lowest eval loss
    c.checkpoint = dict(every=0, keep=2, keep_best=True)
    c.eval = dict(
        every=0,
        final=True,
        max_examples=200,
        # scores of greedy replies on the eval split, comma-separated: exact | json_valid | contains | regex |
        # regex:PATTERN (last) | a task scorer such as person_json (see ftjax/scorer_names.py)
        metric="exact",
        few_shot=3,  # k train examples as prior chat turns for the prompted baseline; 0 = no prompted baseline
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


_CHOICES = {
    "method": ("lora", "full"),
    "model.remat": ("minimal", "none", "full", "dots"),
    "model.attention": ("xla", "cudnn"),
    "data.overlong": ("drop", "truncate", "error"),
    "data.on_bad_record": ("error", "skip"),
    "data.loss_on": ("assistant", "all", "last_assistant"),
    "optim.name": ("adamw", "sgd", "adafactor", "lion"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.frozen_dtype": ("float32", "bfloat16", "float16"),
}


def get(c: ml_collections.ConfigDict, key: str):
    """Value at a dotted key, or ConfigError naming the closest valid key."""
    node = c
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(unknown_key_message(c, key))
        node = node[part]
    return node


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check choices and ranges before anything is compiled; one line per problem."""
    for key, choices in _CHOICES.items():
        value = get(c, key)
        if value not in choices:
            raise ConfigError(f"config.{key}={value!r} is not one of {', '.join(choices)}")
    for key in ("train.batch_size", "train.steps", "train.grad_accum", "train.log_every", "data.seq_len",
                "train.max_consecutive_skips", "train.loss_chunk"):
        if get(c, key) < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {get(c, key)}")
    if c.train.early_stop_patience < 0:
        raise ConfigError(f"config.train.early_stop_patience must be >= 0, got {c.train.early_stop_patience}")
    if c.train.early_stop_patience and not (c.eval.every and c.data.eval):
        raise ConfigError("config.train.early_stop_patience needs periodic eval losses: set eval.every and data.eval")
    if c.train.batch_size % c.train.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={c.train.batch_size} is not divisible by "
            f"config.train.grad_accum={c.train.grad_accum}"
        )
    if c.method == "lora" and c.lora.rank < 1:
        raise ConfigError(f"config.lora.rank must be >= 1, got {c.lora.rank}")
    _check_training_ranges(c)
    _check_data_ranges(c)
    _check_eval_forget(c)
    return c


def _check_training_ranges(c: ml_collections.ConfigDict) -> None:
    """Ranges of the lora.*, optim.* and train.* numbers the train step relies on."""
    checks = [
        ("lora.dropout", 0.0 <= c.lora.dropout < 1.0, "be in [0, 1)"),
        ("optim.lr", c.optim.lr > 0, "be > 0"),
        ("optim.warmup_steps", c.optim.warmup_steps >= 0, "be >= 0"),
        ("optim.weight_decay", c.optim.weight_decay >= 0, "be >= 0"),
        ("optim.clip_norm", c.optim.clip_norm >= 0, "be >= 0 (0 disables clipping)"),
        ("optim.min_lr_ratio", 0.0 <= c.optim.min_lr_ratio <= 1.0, "be in [0, 1]"),
        ("optim.momentum", 0.0 <= c.optim.momentum < 1.0, "be in [0, 1)"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"config.{key} must {want}, got {get(c, key)}")


def _check_data_ranges(c: ml_collections.ConfigDict) -> None:
    """Ranges of the data.* numbers the data pipeline relies on."""
    checks = [
        ("data.eval_fraction", 0.0 <= c.data.eval_fraction < 1.0, "be in [0, 1)"),
        ("data.max_dropped_fraction", 0.0 <= c.data.max_dropped_fraction <= 1.0, "be in [0, 1]"),
        ("data.prefetch", c.data.prefetch >= 0, "be >= 0"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"config.{key} must {want}, got {get(c, key)}")


def _check_eval_forget(c: ml_collections.ConfigDict) -> None:
    """eval.metric must name known scorers; forget.* weights and fractions must be in range."""
    check_metric(c.eval.metric)  # ConfigError naming the unknown metric
    checks = [
        ("eval.few_shot", c.eval.few_shot >= 0, "be >= 0"),
        ("forget.max_new_tokens", c.forget.max_new_tokens >= 1, "be >= 1"),
        ("forget.replay_fraction", 0.0 <= c.forget.replay_fraction < 1.0, "be in [0, 1)"),
        ("forget.replay_temperature", c.forget.replay_temperature >= 0, "be >= 0"),
        ("forget.replay_samples", c.forget.replay_samples >= 1, "be >= 1"),
        ("forget.kl_weight", c.forget.kl_weight >= 0, "be >= 0"),
        ("forget.l2_weight", c.forget.l2_weight >= 0, "be >= 0"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"config.{key} must {want}, got {get(c, key)}")
    if c.forget.replay_temperature == 0 and c.forget.replay_samples > 1:
        raise ConfigError("config.forget.replay_samples > 1 needs forget.replay_temperature > 0: greedy replies "
                          f"are all the same (got replay_samples={c.forget.replay_samples})")
    if c.forget.l2_weight > 0 and c.method != "full":
        raise ConfigError("config.forget.l2_weight applies to method=full (W - W_base); with LoRA use "
                          "forget.kl_weight or forget.replay_fraction")
