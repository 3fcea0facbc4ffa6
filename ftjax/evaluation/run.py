"""`Evaluation`: what the training loop and scripts/eval.py call, with the unchanging parts cached in the workdir.

    ev = Evaluation(settings, tokenizer, workdir)        # reads eval/train records and the retain set
    ev.prepare(base)                                     # base replies to the retain prompts (cached)
    ev.baselines(base)                                   # base 0-shot, k-shot, + retrieval scores (cached)
    logged = ev.track(model, base, step)                 # every eval.every: task_*, kl_to_base, ...
    report = ev.report(model, base, step)                # at the end (+ the tuned model with retrieval):
                                                         # report.json/.md, progress.png, table

`settings` is the run's `ftjax.evaluation.settings.EvalSettings` (ftjax.train.compose.eval_settings reads it from
the run config). `base` is the base model, or None for a LoRA model (its adapters are switched off to get it).
Every process computes the same numbers; only the one with `write` (process 0) writes files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from flax import nnx

from ftjax import stop
from ftjax.data.fingerprint import tokenizer_fingerprint
from ftjax.data.mixture import parse_sources
from ftjax.data.retain import load_retain
from ftjax.evaluation import phase_times, report_size, retrieval, shared_cache
from ftjax.evaluation.base import base_view
from ftjax.evaluation.conversations import load_records, pick_shots
from ftjax.evaluation.forgetting import CACHE_NAME, BaseReplies, ForgettingResult, base_replies, forgetting_metrics
from ftjax.evaluation.hosts import everywhere
from ftjax.evaluation.progress import base_point, plot_progress, tracking_metrics
from ftjax.evaluation.report import build_report, write_atomic, write_report
from ftjax.evaluation.settings import EvalSettings
from ftjax.evaluation.task import TaskResult, evaluate_task
from ftjax.platform import platform_of

BASELINES_NAME = "baselines.json"
RETRIEVAL_NAME = "retrieval_baseline.json"  # the base + retrieval row, cached apart (its own key)


def _process_zero() -> bool:
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def _phase(what: str):
    """Costly evaluation phases announce themselves on process 0 when they start ("eval: ...") and say how
    long they took when done: generation on a CPU takes minutes (progress bars inside: ftjax.logs.progress)."""
    start = time.perf_counter()
    if _process_zero():
        print(f"eval: {what} ...", flush=True)
    with stop.phase(what):
        yield
    phase_times.record(what, time.perf_counter() - start)  # the report's timing table
    if _process_zero():
        print(f"eval: {what}: done in {time.perf_counter() - start:.0f} s", flush=True)


def devices_in_words() -> str:
    """This run's devices as the report names them, e.g. "1 cpu device" or "8 × NVIDIA H100 80GB HBM3"."""
    import jax

    devices = jax.devices()
    return f"{len(devices)} × {devices[0].device_kind}" if len(devices) > 1 else f"1 {devices[0].device_kind} device"


class Evaluation:
    """Task generation scores, baselines and forgetting metrics for one run (see the module docstring)."""

    def __init__(self, settings: EvalSettings, tokenizer: Any, workdir: str | os.PathLike, *,
                 write: bool | None = None, held_out: Any = None, generation_task: bool = True):
        """`held_out`: the objective's report rows (`ftjax.objectives.ReportRows`: e.g. preference accuracy on
        held-out pairs), measured for the base and the tuned model; `generation_task`: the eval data are
        generation examples (not, e.g., preference pairs)."""
        self.settings, self.tokenizer, self.workdir = settings, tokenizer, Path(workdir)
        self.held_out = held_out
        self.write = _process_zero() if write is None else write
        d = settings.data
        self.records = load_records(d.eval, d.fields) if d.eval and generation_task else []
        self.shots, self.train_records = [], []
        if self.records and settings.eval.few_shot > 0 and d.train:
            first = parse_sources(d.train)[0].path  # the task's own data, never the replay file
            self.train_records = load_records(first, d.fields)
            self.shots = pick_shots(self.train_records, settings.eval.few_shot, seed=d.seed)
        # read up front: a bad document fails here with its file:line, before any generation
        self.documents = retrieval.load_documents(settings.eval.documents) \
            if self.records and settings.eval.documents else None
        self.retain = load_retain(settings.retain)
        self.replies: BaseReplies | None = None
        self._tracked: tuple[int, TaskResult | None, ForgettingResult] | None = None

    @property
    def has_task(self) -> bool:
        """Generation scores need eval records from a file (data.eval)."""
        return bool(self.records)

    def _base(self, model: nnx.Module, base: nnx.Module | None) -> nnx.Module:
        return base_view(model) if base is None else base

    def _task(self, model: nnx.Module, shots=(), with_loss: bool = True, which: str = "model",
              prompt_of=None) -> TaskResult:
        c = self.settings
        most = report_size.max_examples(c)  # eval.report=quick: fewer, and the eval loss on those
        n = min(len(self.records), most) if most else len(self.records)
        with _phase(f"{which} on {n} eval examples" + (f", {len(shots)}-shot" if shots else "")):
            return evaluate_task(model, self.tokenizer, self.records, c.eval.metric, max_examples=most, shots=shots,
                                 with_loss=with_loss, loss_on_all=report_size.loss_on_all(c), prompt_of=prompt_of)

    @functools.cached_property
    def retrieved(self) -> retrieval.RetrievalPrompts | None:
        """The retrieval rows' prompts (eval.few_shot examples or passages per eval record), or None."""
        c = self.settings
        train = (self.train_records, parse_sources(c.data.train)[0].path) if self.train_records else None
        documents = (self.documents, c.eval.documents) if self.documents else None
        return retrieval.retrieval_prompts(self.records, c.data.eval, c.eval.few_shot, train=train,
                                           documents=documents)

    def model_id(self) -> str:
        return self.settings.model_id

    def _base_identity(self) -> dict[str, Any]:
        """The base model by content (shared-cache key): weight files' hashes, dtypes, backend, template."""
        c = self.settings
        dtypes = {**c.dtypes, "backend": platform_of()}  # the evaluation runs on this process's devices
        if c.quant is not None:  # absent for a full-precision base: existing cache keys stay valid
            dtypes["frozen_quant"] = c.quant
        return {"base": shared_cache.base_content_id(c.model_path, dtypes),
                "template": tokenizer_fingerprint(self.tokenizer)}

    def prepare(self, base: nnx.Module) -> BaseReplies:
        """The base model's greedy replies to the retain prompts (generated once, cached in the workdir and
        shared across workdirs in $FTJAX_CACHE)."""
        if self.replies is None:
            path = self.workdir / CACHE_NAME
            c = self.settings
            identity = {**self._base_identity(), "retain": shared_cache.data_content_id(c.retain),
                        "max_new_tokens": c.max_new_tokens, "model_id": self.model_id()}
            shared = shared_cache.lookup("retain_replies", identity) if not path.is_file() else None
            if everywhere(shared is not None) and self.write:
                write_atomic(path, json.dumps(shared, ensure_ascii=False))
            what = f"base replies to {len(self.retain)} retain prompts"
            with _phase(what + (": cached ($FTJAX_CACHE)" if shared is not None else "")):
                self.replies = base_replies(base, self.tokenizer, self.retain,
                                            max_new_tokens=c.max_new_tokens, cache=path,
                                            model_id=self.model_id(), write=self.write)
            if self.write and shared is None and path.is_file():
                shared_cache.store("retain_replies", identity, json.loads(path.read_text()))
        return self.replies

    def baseline_identity(self) -> dict[str, Any]:
        """What the base and few-shot task results depend on: base content, eval data content, few-shot
        source content with its seed and k, example count, metric, decoding (greedy) and template."""
        c = self.settings
        shots = None
        if self.shots:
            shots = {"source": shared_cache.data_content_id(parse_sources(c.data.train)[0].path),
                     "seed": c.data.seed, "k": len(self.shots)}
        return {**self._base_identity(), "eval": shared_cache.data_content_id(c.data.eval), "few_shot": shots,
                "max_examples": c.eval.max_examples, "metric": c.eval.metric,
                "decoding": "greedy; max_new_tokens = longest reference + 16", **report_size.identity(c),
                "costs": "prompt_tokens, seconds_per_query"}  # entries stored before the cost rows lack them

    def retrieval_identity(self) -> dict[str, Any]:
        """What the base + retrieval row depends on: the baselines' key with the selection's in place of the
        fixed shots' (the collection's content, k, the retriever and the passages' template)."""
        key = {k: v for k, v in self.baseline_identity().items() if k != "few_shot"}
        return {**key, "retrieval": self.retrieved.identity}

    def baselines(self, base: nnx.Module) -> dict[str, TaskResult]:
        """Base zero-shot, k-shot prompted and + retrieval results on the eval split (cached in the workdir and in
        $FTJAX_CACHE under `baseline_identity` / `retrieval_identity`, so another workdir on the same base and
        data reuses them)."""
        if not self.has_task:
            return {}
        shots = f" and {len(self.shots)}-shot prompted" if self.shots else ""

        def prompts() -> dict[str, TaskResult]:
            out = {"base": self._task(base, which="base model")}
            if self.shots:
                out["prompted"] = self._task(base, self.shots, which="base model prompted")
            return out

        results = self._cached(BASELINES_NAME, "baselines", self.baseline_identity(), prompts, f"base model{shots}")
        if self.retrieved is not None:
            results.update(self._cached(
                RETRIEVAL_NAME, "retrieval_baseline", self.retrieval_identity(),
                lambda: {"retrieval": self._task(base, which="base model + retrieval", prompt_of=self.retrieved)},
                "base model + retrieval"))
        return results

    def _cached(self, name: str, kind: str, key: dict[str, Any], compute, what: str) -> dict[str, TaskResult]:
        """`compute()`'s results, read from WORKDIR/name or $FTJAX_CACHE/kind when stored under `key`, else stored."""
        path = self.workdir / name
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if everywhere(saved.get("key") == key):
            self._say_cached(what, "workdir")
            return {k: TaskResult.from_json(v) for k, v in saved["results"].items()}
        results = shared_cache.lookup(kind, key)
        if everywhere(results is not None):
            self._say_cached(what, "$FTJAX_CACHE")
        else:
            results = {k: v.to_json() for k, v in compute().items()}
            if self.write:
                shared_cache.store(kind, key, results)
        if self.write:
            write_atomic(path, json.dumps({"key": key, "results": results}))
        return {k: TaskResult.from_json(v) for k, v in results.items()}

    def _say_cached(self, what: str, where: str) -> None:
        if self.write:
            print(f"eval: {what} results: cached ({where})", flush=True)

    def _held_out_base(self, base: nnx.Module) -> dict:
        """The objective's held-out rows measured on the base (e.g. the DPO base's preference accuracy), shared
        across workdirs in $FTJAX_CACHE like the baselines: keyed by the base's content, the held-out data's
        content, the row length and the objective with its own settings group."""
        c, h = self.settings, self.held_out
        key = {**self._base_identity(), "held_out": h.key, "about": h.about, "objective": c.objective,
               "settings": c.objective_settings, "seed": c.data.seed, "eval": shared_cache.data_content_id(c.data.eval),
               "seq_len": c.data.seq_len}
        found = shared_cache.lookup("held_out_base", key)
        if everywhere(found is not None):
            if self.write:
                print(f"eval: base model's {h.about}: cached ($FTJAX_CACHE)", flush=True)
            return found
        measured = h.measure(base)
        if self.write:
            shared_cache.store("held_out_base", key, measured)
        return measured

    def track(self, model: nnx.Module, base: nnx.Module | None = None, step: int = -1) -> dict[str, float]:
        """The metrics to log at an eval step: task_<score> for each eval.metric score, kl_to_base,
        retain_nll, qa_accuracy (see progress.py)."""
        base = self._base(model, base)
        replies = self.prepare(base)
        task = self._task(model) if self.has_task else None
        forget = forgetting_metrics(model, base, self.tokenizer, replies)
        self._tracked = (step, task, forget)
        own = self.held_out.tracked(self.held_out.measure(model)) if self.held_out else {}
        return {**tracking_metrics(task, forget), **own}

    def report(self, model: nnx.Module, base: nnx.Module | None = None, step: int = -1, *,
               extra_meta: dict | None = None) -> dict:
        """The before/after report (written on process 0: report.json, report.md, progress.png; printed)."""
        started, first_phase = time.perf_counter(), phase_times.mark()  # the report's own time, and its phases
        base = self._base(model, base)
        replies = self.prepare(base)
        if self._tracked is not None and self._tracked[0] == step and step >= 0:
            _, task, forget = self._tracked  # already measured at this step by track()
        else:
            task = self._task(model, which="fine-tuned model") if self.has_task else None
            with _phase("forgetting metrics"):
                forget = forgetting_metrics(model, base, self.tokenizer, replies)
        held_out = None
        if self.held_out is not None:
            h = self.held_out
            with _phase(f"{h.about}, base and fine-tuned"):
                section = {"base": self._held_out_base(base), "finetuned": h.measure(model)}
            held_out = {"key": h.key, "section": section, "rows": h.table(section), "about": h.about}
        c = self.settings
        results = dict(self.baselines(base))
        if task is not None:
            results["finetuned"] = task
            if self.retrieved is not None and report_size.tuned_retrieval(c):
                results["finetuned_retrieval"] = self._task(model, which="fine-tuned model + retrieval",
                                                            prompt_of=self.retrieved)
        run = dict(c.run)
        extra = dict(extra_meta or {})
        run.update(extra.pop("run", {}))  # e.g. wall_s from the loop
        run["report_s"] = time.perf_counter() - started
        extra["phases"] = phase_times.since(first_phase)
        meta = {"step": step, "model": c.model_path, "method": c.method, "objective": c.objective,
                "metric": c.eval.metric,
                "few_shot": len(self.shots), "run": run, **extra}
        if self.has_task:  # where the cost rows' seconds were measured
            meta["devices"] = devices_in_words()
        if self.retrieved is not None:
            meta["retrieval"] = self.retrieved.describe()
        if c.base_quant is not None:  # "base" is the model as trained against: the quantized one
            meta["base_quant"] = c.base_quant
        report = build_report(results, forget, replies, meta=meta, held_out=held_out)
        if self.write:
            write_report(self.workdir, report)
            points = [base_point(results.get("base"), forget)]
            if step >= 0:
                points.append({"step": step, **tracking_metrics(task, forget)})
            plot_progress(self.workdir, points)
        return report
