"""`run(config, workdir)`: the training job that scripts/train.py and the tests call.

Data flows once: host batches -> sharded global batch -> one jitted step; metrics are fetched
every `train.log_every` steps (and at the last step). Checkpoints every `checkpoint.every` steps
and at the end; a workdir with checkpoints resumes from the latest complete one. SIGTERM/SIGINT
finish the current step, save, and return normally. With `train.early_stop_patience`, the run ends
(saved, reported) after that many periodic evals without a lower eval loss.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ftjax import config as config_lib
from ftjax import data as data_lib
from ftjax import metrics as metrics_lib
from ftjax.api import load_tokenizer, model_config
from ftjax.checkpoint import Checkpoints
from ftjax.errors import ConfigError
from ftjax.evaluation.run import Evaluation
from ftjax.provenance import base_identity, check_same
from ftjax.sharding import batch_sharding, batch_shards, mesh_from_config
from ftjax.train import forget
from ftjax.train.early_stop import EarlyStop
from ftjax.train.eval_loss import eval_loss, make_eval_loss
from ftjax.train.memory import check_fits
from ftjax.train.optimizer import raise_if_diverged
from ftjax.train.setup import build_state
from ftjax.train.state import state_size
from ftjax.train.step import make_train_step


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves at the end of the current step (multi-host: JAX's
    preemption sync point makes every host stop at the same step)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if jax.process_count() > 1:
            # A stop seen by one host must stop every host at the same step (the save is collective):
            # hand it to JAX's preemption notifier, which agrees on that step with all of them.
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _inject_fault(step: int) -> None:
    """Fault injection for the crash/preemption tests: FTJAX_FAULT=kill@N, term@N or int@N signals this process."""
    fault = os.environ.get("FTJAX_FAULT", "")
    if "@" in fault and int(fault.split("@")[1]) == step:
        kinds = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
        os.kill(os.getpid(), kinds[fault.split("@")[0]])


def _evaluating(config) -> bool:
    return bool(config.data.eval) and bool(config.eval.final or config.eval.every)


def _evaluation(config, tokenizer, workdir: Path, state, base_trainable):
    """Task scores, baselines and forgetting (ftjax.evaluation) when the run has eval data.

    The base model is the LoRA model with adapters detached (no copy: base=None), or for full
    fine-tuning the copy of the initial weights taken before the first (donating) step.
    """
    if not _evaluating(config):
        return None, None
    base = None
    if config.method == "full":
        base = nnx.merge(state.graphdef, base_trainable, state.frozen)
    return Evaluation(config, tokenizer, workdir), base


def check_batch_fits(config, mesh) -> None:
    """The global batch must split over grad_accum micro-batches and the mesh's batch shards."""
    shards = batch_shards(mesh)
    need = shards * config.train.grad_accum
    if config.train.batch_size % need:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of "
                          f"{need} (train.grad_accum={config.train.grad_accum} x {shards} batch shards of mesh "
                          f"{dict(mesh.shape)})")


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run(config, workdir: str | Path, *, until: int | None = None) -> dict[str, Any]:
    """Train (or resume) per `config` in `workdir`; returns the final metrics.

    `until` stops after that step as a preemption would (save, return): tests use it to split a
    run in two without changing its schedule.
    """
    config_lib.validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main_process = jax.process_index() == 0

    mesh = mesh_from_config(config)  # a mesh that does not fit the devices fails here, before any load
    check_batch_fits(config, mesh)
    tokenizer = load_tokenizer(config.model.path)
    model_cfg = model_config(config.model.path)
    data = data_lib.build_datasets(config, tokenizer, vocab_size=model_cfg.vocab_size)
    if not config.forget.replay_fraction:
        _say(data.summary.format())
    _say(check_fits(config, model_cfg, mesh))  # stops here, before loading or compiling, if it cannot fit

    setup = build_state(config, mesh)
    state = setup.state
    n_trainable = state_size(state.trainable)[1]
    _say(f"{config.method}: {n_trainable:,} trainable parameters; mesh {dict(mesh.shape)}")

    # Forgetting control: the step-0 copy (full fine-tuning), then the control data (base replies, cached).
    base_trainable = forget.base_copy(state) if forget.wants_base_copy(config, _evaluating(config)) else None
    evaluation, base = _evaluation(config, tokenizer, workdir, state, base_trainable)
    retain = forget.retain_data(config, tokenizer, workdir, state, base_trainable)
    if config.forget.replay_fraction:
        data = data_lib.build_datasets(config, tokenizer, vocab_size=model_cfg.vocab_size,
                                       replay=(retain.replay_path, config.forget.replay_fraction))
        _say(data.summary.format())
    regularized = config.forget.kl_weight > 0 or config.forget.l2_weight > 0
    step_base = base_trainable if config.method == "full" and regularized else None
    step_fn = make_train_step(state, setup.optimizer, mesh, grad_accum=config.train.grad_accum,
                              loss_chunk=config.train.loss_chunk, kl_weight=config.forget.kl_weight,
                              l2_weight=config.forget.l2_weight, with_base=step_base is not None)
    sharding = batch_sharding(mesh)
    it = data_lib.train_iterator(data.train, config.train.batch_size, seed=config.seed, sharding=sharding,
                                 prefetch=config.data.prefetch)
    retain_it = forget.retain_batches(config, retain, sharding)
    provenance = {"base": base_identity(config.model.path),
                  "data": {**data.summary.fingerprints, **forget.retain_fingerprint(config, retain)}}
    keep_best = config.checkpoint.keep_best and data.eval is not None
    ckpt = Checkpoints(workdir, keep=config.checkpoint.keep, keep_best=keep_best)
    start = 0
    early, stopped_early = EarlyStop(config.train.early_stop_patience), False
    latest = ckpt.latest_step()
    trainable, opt_state = state.trainable, state.opt_state
    if latest is not None:
        recorded = ckpt.read_meta(latest).get("provenance", {})
        check_same(recorded.get("base", {}), provenance["base"], "base model")
        check_same(recorded.get("data", {}), provenance["data"], "training data")
        restored, meta = ckpt.restore(latest, {"trainable": trainable, "opt_state": opt_state})
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        it.set_state(meta["data_state"])
        if retain_it is not None:
            retain_it.set_state(meta["retain_state"])
        early = EarlyStop.from_state(config.train.early_stop_patience, meta.get("early_stop"))
        stopped_early = bool(meta.get("stopped_early"))
        start = latest
        _say(f"resumed from step {latest}" + (" (early stopping had ended this run)" if stopped_early else ""))
    if main_process:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    sums_fn = make_eval_loss(state.graphdef, config.train.loss_chunk) if data.eval is not None else None

    def run_eval() -> float:
        batches = data_lib.eval_iterator(data.eval, config.train.batch_size, sharding=sharding)
        return eval_loss(sums_fn, trainable, state.frozen, batches)

    seq_len = config.data.seq_len
    tokens_per_step = config.train.batch_size * seq_len
    lora_params = n_trainable if config.method == "lora" else 0
    flops_token = metrics_lib.flops_per_token(model_cfg, seq_len, config.method, lora_params)
    peak, peak_source = metrics_lib.peak_flops(config.model.dtype)
    peak_total = peak * jax.device_count()
    writer = metrics_lib.MetricsWriter(workdir, enabled=main_process)
    base_key = jax.random.key(config.seed)
    last: dict[str, Any] = {}
    progress = _progress(start, config.train.steps, main_process)
    t_last, steps_since = time.perf_counter(), 0
    step = start

    def state_model():
        """The current model (shares the arrays; used between steps only)."""
        return nnx.merge(state.graphdef, trainable, state.frozen)

    def fetch(metrics, now: float) -> dict[str, Any]:
        """The step's metrics on the host (one sync), with throughput since the last fetch."""
        nonlocal t_last, steps_since
        fetched = jax.device_get(metrics)
        tps = steps_since * tokens_per_step / (now - t_last)
        t_last, steps_since = now, 0
        values = {"loss": float(fetched["loss"]), "lr": float(fetched["lr"]),
                  "grad_norm": float(fetched["grad_norm"]), "tokens_per_s": tps,
                  "mfu": tps * flops_token / peak_total, "trained_tokens": int(fetched["tokens"]),
                  "skipped_steps": int(fetched["skipped"])}
        values.update({k: float(fetched[k]) for k in ("kl_reg", "l2_reg", "loss_total") if k in fetched})
        raise_if_diverged(fetched, config.train.max_consecutive_skips)
        return values

    last_step = start if stopped_early else config.train.steps
    with _StopRequest() as stop:
        for step in range(start + 1, last_step + 1):
            batch = next(it)
            retain_batch = next(retain_it) if retain_it is not None else None
            rng = jax.random.fold_in(base_key, step)
            trainable, opt_state, metrics = step_fn(trainable, opt_state, state.frozen, batch, rng, step_base,
                                                    retain_batch)
            _inject_fault(step)
            steps_since += 1
            is_last = step == config.train.steps
            stopping = stop.should_stop(step) or step == until
            values: dict[str, Any] = {}
            if step % config.train.log_every == 0 or is_last or stopping:
                values = fetch(metrics, time.perf_counter())
            every = config.eval.every
            periodic = bool(every) and step % every == 0
            if sums_fn is not None and (periodic or (is_last and config.eval.final)):
                t_eval = time.perf_counter()
                values["eval_loss"] = run_eval()
                if periodic and early.update(values["eval_loss"]) and not is_last:
                    stopped_early = stopping = True
                    if "loss" not in values:  # the last step is always logged
                        values.update(fetch(metrics, t_eval))
                if evaluation is not None and periodic:
                    values.update(evaluation.track(state_model(), base, step))
                t_last = time.perf_counter()  # eval time is not training throughput
            if values:
                writer.write(step, values)
                last.update(values)
                progress.update(step, last)
            if (config.checkpoint.every and step % config.checkpoint.every == 0) or is_last or stopping:
                meta = {"step": step, "data_state": it.get_state(), "config": config.to_dict(),
                        "provenance": provenance, "early_stop": early.state(), "stopped_early": stopped_early}
                if retain_it is not None:
                    meta["retain_state"] = retain_it.get_state()
                ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, meta,
                          eval_loss=values.get("eval_loss"))
            if stopped_early:
                _say(f"early stopping: no lower eval loss in {early.patience} evals "
                     f"(best {early.best:.4f}); saved step {step}")
                break
            if stopping:
                _say(f"stop requested: saved step {step}, exiting")
                break
    progress.close()
    reporting = evaluation is not None and config.eval.final and (step == config.train.steps or stopped_early)
    report_step = ckpt.best_step() if reporting and keep_best else step
    ckpt.close()  # the final save is complete before the (long) report
    if reporting and report_step != step:  # the report describes the weights export takes: the best
        reader = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False, read_only=True)
        try:  # a reader of its own: the writer's handlers were registered for whole-state saves
            trainable = reader.restore_trainable(report_step, trainable)
        finally:
            reader.close()
        _say(f"report: the best checkpoint, step {report_step} (lowest eval loss), not the final step {step}")
    if reporting:
        last["report"] = evaluation.report(state_model(), base, report_step, extra_meta={"final_step": step})
    it.close()
    if retain_it is not None:
        retain_it.close()
    writer.close()
    if main_process:
        metrics_lib.plot_losses(workdir)
    return {"step": step, **last, "stopped_early": stopped_early, "peak_flops": peak, "peak_source": peak_source}


class _progress:
    """A tqdm bar on process 0: step, loss, tokens/s, ETA."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.pos = start

    def update(self, step: int, values: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.pos)
        self.pos = step
        shown = {"loss": ("loss", ".4f"), "tok/s": ("tokens_per_s", ".0f"), "eval": ("eval_loss", ".4f")}
        post = {name: format(values[key], spec) for name, (key, spec) in shown.items() if key in values}
        self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
