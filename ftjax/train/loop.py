"""`run(config, workdir)`: the training job that scripts/train.py and the tests call.

prepare -> steps -> finish. Data flows once: host batches -> sharded global batch -> one jitted step;
after each step the periodic actions (ftjax/train/periodic.py) evaluate, log (metrics fetched every
`train.log_every` steps and at the last one) and checkpoint (every `checkpoint.every` steps and at the
end). A workdir with checkpoints resumes from the latest complete one. SIGTERM/SIGINT finish the current
step, save, and return normally. With `train.early_stop_patience`, the run ends (saved, reported) after
that many periodic evals without a lower eval loss.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from ftjax import config as config_lib
from ftjax import data as data_lib
from ftjax import stop, workdir_lock
from ftjax.api import load_tokenizer, model_config
from ftjax.checkpoint import Checkpoints
from ftjax.errors import ConfigError
from ftjax.evaluation import report_size
from ftjax.evaluation.run import Evaluation
from ftjax.history_cut import cut_history
from ftjax.logs import heartbeat, still
from ftjax.metrics.peaks import peak_flops
from ftjax.metrics.plot import plot_losses
from ftjax.metrics.writer import MetricsWriter
from ftjax.objectives import BatchSource, Reference
from ftjax.objectives.terms import Term, uses_reference
from ftjax.provenance import base_identity, check_resume_config, check_same
from ftjax.sharding import activation_sharding, batch_sharding, batch_shards
from ftjax.train import final_eval, forget
from ftjax.train.compose import Run, compose, loss_terms, objective_terms, reference_identity
from ftjax.train.early_stop import EarlyStop
from ftjax.train.memory import check_fits
from ftjax.train.periodic import Evaluate, LogMetrics, Meter, Progress, SaveCheckpoint, Tick
from ftjax.train.setup import build_state
from ftjax.train.state import TrainState, state_size
from ftjax.train.step import Frozen, TrainStep, make_train_step

Action = Callable[[Tick], None]  # a periodic action: called after every step with what the step left


def check_batch_fits(batch_size: int, grad_accum: int, mesh, rules: dict) -> None:
    """The global batch must split over grad_accum micro-batches and the mesh's batch shards."""
    shards = batch_shards(mesh, rules)
    need = shards * grad_accum
    if batch_size % need:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of {need} (train.grad_accum="
                          f"{grad_accum} x {shards} batch shards of mesh {dict(mesh.shape)})")


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class Batches:
    """The objective's batch source, each batch with its retain batch as `batch["retain"]` when the KL term reads
    one; their positions travel in the checkpoint's metadata."""

    def __init__(self, train: BatchSource, retain=None):
        self.train, self.retain = train, retain

    def next(self, trainable) -> dict:
        batch = self.train.next(trainable)
        return batch if self.retain is None else {**batch, "retain": next(self.retain)}

    def metrics(self, trainable) -> dict:
        """The source's host figures of the step that produced `trainable`."""
        return self.train.metrics(trainable)

    def state(self) -> dict:
        out = {"data_state": self.train.state()}
        return out if self.retain is None else {**out, "retain_state": self.retain.get_state()}

    def restore(self, meta: dict) -> None:
        self.train.restore(meta["data_state"])
        if self.retain is not None:
            self.retain.set_state(meta["retain_state"])

    def close(self) -> None:
        self.train.close()
        if self.retain is not None:
            self.retain.close()


@dataclasses.dataclass
class Job:
    """What `prepare` builds for the steps and `finish`: state, step, batches, checkpoints, evaluation."""

    run: Run
    workdir: Path
    state: TrainState
    step_fn: TrainStep
    frozen: Frozen  # the frozen weights, and the step-0 copy where a loss term compares with it
    batches: Batches
    ckpt: Checkpoints
    keep_best: bool
    provenance: dict
    trainable: Any  # latest trainable weights and optimizer state (restored on resume)
    opt_state: Any
    start: int  # the last step already done
    early: EarlyStop
    stopped_early: bool
    held_out: Callable[[Any], float] | None  # trainable -> the objective's held-out loss; without eval data None
    evaluation: Any  # ftjax.evaluation.run.Evaluation, or None
    pretrained: Any  # the model before training that the evaluation compares with (None: LoRA's adapters off)
    flops_per_token: float
    actions: Sequence[Action] = ()  # handed to `run`: called after the loop's own each step
    t0: float = dataclasses.field(default_factory=time.perf_counter)  # when the job started (report wall time)

    @property
    def final_from_report(self) -> bool:
        """Whether the report's eval loss is the last eval point (ftjax/train/final_eval.py)."""
        return final_eval.from_report(self.run, self.evaluation)

    def model(self, trainable) -> nnx.Module:
        """The model with these trainable weights (shares the arrays; used between steps only)."""
        return nnx.merge(self.state.graphdef, trainable, self.state.frozen)


def run(config, workdir: str | Path, *, until: int | None = None, terms: Sequence[Term] = (),
        actions: Sequence[Action] = ()) -> dict[str, Any]:
    """Train (or resume) per `config` in `workdir`; returns the final metrics.

    `terms`: loss terms added to the run's own; `actions`: called after each step, after the loop's own
    (evaluate, log, save), with the step's `Tick`. `until` stops after that step as a preemption would (save,
    return): tests use it to split a run in two without changing its schedule. A second run on a workdir that one
    holds stops at once.
    """
    parts = compose(config)  # validated, `auto` resolved: once per run
    with stop.listening(), workdir_lock.held(workdir):  # also as a library, not only through scripts/train.py
        job = prepare(parts, Path(workdir), terms, actions)
        with activation_sharding(job.step_fn.mesh, job.step_fn.rules):  # evals split their rows as steps do
            step, stopped_early, last = steps(job, until)
            return finish(job, step, stopped_early, last)


def prepare(run: Run, workdir: Path, extra_terms: Sequence[Term] = (), actions: Sequence[Action] = ()) -> Job:
    """Everything before the first step: data, state, forgetting control, the reference, the step, resume."""
    config, method, objective, s = run.config, run.method, run.objective, run.schedule
    workdir.mkdir(parents=True, exist_ok=True)
    _check_resumable(config.to_dict(), run.checkpointing.keep, workdir)  # a changed config stops here, before any work
    mesh, rules = run.mesh, run.rules
    check_batch_fits(s.batch_size, s.grad_accum, mesh, rules)
    with still("reading the data", _say):  # thousands of records tokenized: up to a minute under load, unseen
        tokenizer = load_tokenizer(run.model.path)
        model_cfg = model_config(run.model.path)
        config_lib.validate_for_model(config, model_cfg)
        data = objective.read_data(run, tokenizer, model_cfg.vocab_size)
    if not run.forget.replay_fraction:
        _say(data.summary.format())
    _say(check_fits(run, model_cfg))  # stops here, before loading or compiling, if it cannot fit

    with still("loading the model", _say):  # the weights read and placed: bin/demo's longest silence otherwise
        setup = build_state(run)
    state = setup.state
    n_trainable = state_size(state.trainable)[1]
    _say(f"{method.name}: {n_trainable:,} trainable parameters; mesh {dict(mesh.shape)}; attention "
         f"{setup.model_config.attention_kernels(s.seq_len)}")

    # Forgetting control: the step-0 copy (full fine-tuning), then the control data (base replies, cached).
    # ... and a continued adapter's starting copy (megabytes): DPO's reference and the report's pre-trained model;
    # and the step-0 copy an objective's reference reads where the method has no free one (Reference.FROZEN_COPY)
    reference = objective.reference(start_copy_is_free=not method.keeps_start_copy)
    keep_start = (forget.keeps_start_copy(method, run.forget, run.evaluation.reporting) or setup.continues_adapter
                  or reference == Reference.FROZEN_COPY)
    start_copy = forget.start_copy(state) if keep_start else None
    # the step-0 model when its trainable weights were copied (full fine-tuning; a continued adapter), else None
    # (LoRA: the pre-trained model is this one with its adapters detached, no copy)
    step0 = nnx.merge(state.graphdef, start_copy, state.frozen) if start_copy is not None else None
    evaluation, pretrained = None, None
    if run.evaluation.reporting:  # task scores, baselines and forgetting (ftjax.evaluation)
        evaluation = Evaluation(run.eval_settings, tokenizer, workdir, generation_task=objective.generation_task,
                                held_out=objective.report_rows(data.eval, s.batch_size, s.loss_chunk))
        pretrained = step0
    with activation_sharding(mesh, rules):  # the pre-trained model's replies: rows split over the batch axes
        retain = forget.retain_data(run, tokenizer, workdir, state, start_copy)
    if run.forget.replay_fraction:
        data = objective.read_data(run, tokenizer, model_cfg.vocab_size,
                                   replay=(retain.replay_path, run.forget.replay_fraction))
        _say(data.summary.format())
    own = objective_terms(run)
    terms = loss_terms(run, model_cfg, extra_terms, own)
    if reference == Reference.CACHE:  # the reference's log-probs, computed once (or read from the workdir)
        data = objective.with_reference(data, state.model(), s.batch_size, s.loss_chunk, workdir,
                                        reference_identity(run, tokenizer, data), _say)
    # LoRA's reference: its adapters zeroed (no copy), or the continued adapter's starting copy
    # a teacher of its own (objective=distill with a teacher path), placed like the frozen weights
    teacher = objective.prepare_teacher(run, mesh, setup.rules, step0)
    with_start_copy = ((method.keeps_start_copy or setup.continues_adapter)
                       and uses_reference(terms, own_teacher=teacher is not None))
    step_fn = make_train_step(state, setup.optimizer, mesh, terms=terms, grad_accum=s.grad_accum,
                              rules=setup.rules, with_start_copy=with_start_copy, teacher=teacher)
    sharding = batch_sharding(mesh, setup.rules)
    objective.bind_policy(state.graphdef, state.frozen)  # a source sampling from the policy uses the step's arrays
    batches = Batches(objective.batches(data.train, s.batch_size, s.seed, sharding, run.feed.prefetch),
                      forget.retain_batches(run, retain, sharding))
    provenance = {"base": base_identity(run.model.path),
                  "data": {**data.summary.fingerprints, **forget.retain_fingerprint(run.forget.kl_weight, retain)}}
    keep_best = run.checkpointing.keep_best and data.eval is not None
    ckpt = Checkpoints(workdir, keep=run.checkpointing.keep, keep_best=keep_best)

    frozen = Frozen(state.frozen, start_copy if with_start_copy else None, teacher.params if teacher else None)
    held_out = None
    if data.eval is not None:  # the objective's own terms on held-out data (not the router's balance loss)
        loss_fn = objective.held_out(state.graphdef, own, s.loss_chunk)

        def held_out(trainable) -> float:
            return loss_fn(trainable, frozen, data_lib.eval_iterator(data.eval, s.batch_size, sharding=sharding))

    job = Job(run, workdir, state, step_fn, frozen, batches,
              ckpt, keep_best, provenance, state.trainable, state.opt_state, 0,
              EarlyStop(s.early_stop_patience), False, held_out, evaluation, pretrained,
              method.flops_per_token(model_cfg, s.seq_len, state.trainable), tuple(actions))
    _resume(job)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        if moved := cut_history(workdir, job.start):  # one history: rows past the resumed step set aside
            print(moved, flush=True)
        if warning := job.ckpt.room_warning((job.trainable, job.opt_state), run.checkpointing.keep):
            print(warning, flush=True)  # before the first save: the disk cannot hold what the run keeps
    return job


def _check_resumable(settings: dict, keep: int, workdir: Path) -> None:
    """Refuse, in one line, to resume a run whose recorded config differs from `settings` (this run's, as a
    dict) outside the may-change list."""
    reader = Checkpoints(workdir, keep=keep, async_save=False, read_only=True)
    try:
        recorded = reader.newest_meta()
        if recorded is not None:
            check_resume_config(recorded.get("config", {}), settings, config_lib.default_config().to_dict())
    finally:
        reader.close()


def _resume(job: Job) -> None:
    """From the newest complete checkpoint that reads, if any: weights, optimizer, data position, early stop."""
    found = job.ckpt.restore_newest({"trainable": job.trainable, "opt_state": job.opt_state}, _say)
    if found is None:
        return
    latest, restored, meta = found
    recorded = meta.get("provenance", {})
    check_same(recorded.get("base", {}), job.provenance["base"], "base model")
    check_same(recorded.get("data", {}), job.provenance["data"], "training data")
    job.trainable, job.opt_state = restored["trainable"], restored["opt_state"]
    job.batches.restore(meta)
    job.early = EarlyStop.from_state(job.run.schedule.early_stop_patience, meta.get("early_stop"))
    job.stopped_early = bool(meta.get("stopped_early"))
    job.start = latest
    _say(f"resumed from step {latest}" + (" (early stopping had ended this run)" if job.stopped_early else ""))


def steps(job: Job, until: int | None) -> tuple[int, bool, dict]:
    """The steps, each followed by the periodic actions; returns (last step, stopped early, last values).

    The step is compiled before the clock starts (`compile_s` on the first logged line). A stop requested
    by a signal saves the step in hand and raises `stop.StopRequested` (the entry point exits 130 / 143);
    `until` stops the same way but returns (tests split a run in two with it)."""
    s, config = job.run.schedule, job.run.config
    seed_key = jax.random.key(s.seed)
    trainable, opt_state, step, stopped_early = job.trainable, job.opt_state, job.start, job.stopped_early
    last_step = job.start if stopped_early else s.steps
    first = job.batches.next(trainable) if last_step > job.start else None
    compile_s = None
    if first is not None:
        with stop.phase("compiling the train step"), still("compiling the train step", _say):
            compile_s = job.step_fn.compile(trainable, opt_state, job.frozen, first,
                                            jax.random.fold_in(seed_key, job.start + 1))
        _say(f"compiled the train step in {compile_s:.1f} s")
    peak, _ = peak_flops(job.run.model.dtype)
    meter = Meter(s.batch_size * s.seq_len, job.flops_per_token, peak * jax.device_count(),
                  s.max_consecutive_skips, job.step_fn.metric_names)
    main = jax.process_index() == 0
    log = LogMetrics(s.log_every, meter, MetricsWriter(job.workdir, enabled=main),
                     Progress(job.start, s.steps, main))

    def meta(tick: Tick) -> dict:
        return {"step": tick.step, **job.batches.state(), "config": config.to_dict(), "provenance": job.provenance,
                "early_stop": job.early.state(), "stopped_early": tick.stopped_early}

    actions = [log, SaveCheckpoint(job.run.checkpointing.every, job.ckpt, meta, clock=meter.clock), *job.actions]
    if job.held_out is not None:
        track = None
        if job.evaluation is not None:
            def track(trainable, step):
                with stop.phase(f"evaluation at step {step}"):
                    return job.evaluation.track(job.model(trainable), job.pretrained, step)
        ev = job.run.evaluation
        final = ev.final and not job.final_from_report  # else the report measures it, once
        actions.insert(0, Evaluate(ev.every, final, job.held_out, job.early, meter, track,
                                  status=log.progress.doing))
    interrupted: stop.StopRequested | None = None
    meter.start(compile_s)
    try:
        with stop.phase("training"), heartbeat(log.progress.refresh):  # an eval at a step takes minutes
            for step in range(job.start + 1, last_step + 1):
                rng = jax.random.fold_in(seed_key, step)
                batch = first if step == job.start + 1 else job.batches.next(trainable)
                trainable, opt_state, metrics = job.step_fn(trainable, opt_state, job.frozen, batch, rng)
                tick = Tick(step, trainable, opt_state, metrics, is_last=step == s.steps,
                            stopping=stop.after_step(step) or step == until, values=job.batches.metrics(trainable))
                for action in actions:
                    try:
                        action(tick)
                    except stop.StopRequested as e:  # during an eval: the step is still logged and saved
                        interrupted, tick.stopping = e, True
                stopped_early = tick.stopped_early
                if stopped_early:
                    _say(f"early stopping: no lower eval loss in {job.early.patience} evals "
                         f"(best {job.early.best:.4f}); saved step {step}")
                    break
                if tick.stopping:
                    _say(f"stop requested: saved step {step}, exiting")
                    if interrupted is None and step != until:
                        interrupted = stop.StopRequested(stop.requested() or signal.SIGTERM, "training")
                    break
    finally:
        log.progress.close()
        log.writer.close()
    job.trainable, job.opt_state = trainable, opt_state
    if interrupted is not None:
        job.ckpt.close()  # the save is complete before the process exits
        raise stop.StopRequested(interrupted.signum, interrupted.phase, f"step {step} saved")
    return step, stopped_early, log.last


def _log_point(job: Job, step: int, point: dict) -> None:
    """`point` (the report's eval loss) on a line of its own at the last step, after the step's line was written
    as it ended (nothing waits on the report); read_metrics merges a step's lines."""
    if point and jax.process_index() == 0:
        writer = MetricsWriter(job.workdir)
        writer.write(step, point)
        writer.close()


def finish(job: Job, step: int, stopped_early: bool, last: dict) -> dict[str, Any]:
    """After the steps: the before/after report on the best checkpoint, closing, the loss plot."""
    trainable = job.trainable
    reporting = (job.evaluation is not None and job.run.evaluation.final
                 and (step == job.run.schedule.steps or stopped_early))
    reporting = reporting and report_size.reports(job.run.eval_settings)  # eval.report=none: ends at its last save
    report_step = job.ckpt.best_step() if reporting and job.keep_best else step
    job.ckpt.close()  # the final save is complete before the (long) report
    if reporting and report_step != step:  # the report describes the weights export takes: the best
        reader = Checkpoints(job.workdir, keep=job.run.checkpointing.keep, async_save=False, read_only=True)
        try:  # a reader of its own: the writer's handlers were registered for whole-state saves
            trainable = reader.restore_trainable(report_step, trainable)
        finally:
            reader.close()
        _say(f"report: the best checkpoint, step {report_step} (lowest eval loss), not the final step {step}")
    if reporting:
        with stop.phase("the final report"):
            last["report"] = job.evaluation.report(job.model(trainable), job.pretrained, report_step,
                                                   extra_meta={"final_step": step,
                                                               "run": {"wall_s": time.perf_counter() - job.t0}})
        point = final_eval.eval_point(last["report"]) if job.final_from_report else {}
        _log_point(job, step, point)
        last.update(point)
    job.batches.close()
    if jax.process_index() == 0:
        plot_losses(job.workdir)
    peak, peak_source = peak_flops(job.run.model.dtype)
    return {"step": step, **last, "stopped_early": stopped_early, "peak_flops": peak, "peak_source": peak_source}
