"""The report: an Evaluation over a tiny LoRA run writes report.json with the contract keys, report.md and
progress.png; baselines and base replies are cached; the replay file feeds the data pipeline."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.config import default_config
from ftjax.data.mixture import parse_sources
from ftjax.data.records import Fields, read_file
from ftjax.data.tokenize import tokenize_records
from ftjax.evaluation.forgetting import CACHE_NAME
from ftjax.evaluation.progress import PLOT_NAME, plot_progress, progress_records
from ftjax.data.replay import replay_mixture
from ftjax.evaluation.report import check_report, contract_keys, format_tables
from ftjax.evaluation.run import BASELINES_NAME, Evaluation
from ftjax.lora import apply_lora
from ftjax.models.llama import Llama
from ftjax.train.compose import eval_settings
from hf_helpers import tiny_tokenizer
from train_helpers import TINY


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(user, reply):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


@pytest.fixture
def run_config(tmp_path):
    c = default_config()
    c.model.path = "tiny-test"
    c.data.train = write_jsonl(tmp_path / "train.jsonl", [chat(f"w{i} w{i + 1}", f"w{i + 2}") for i in range(10, 30)])
    c.data.eval = write_jsonl(tmp_path / "eval.jsonl", [chat(f"w{i} w{i + 3}", f"w{i + 4} w{i + 5}")
                                                         for i in range(40, 46)])
    c.forget.retain = write_jsonl(tmp_path / "retain.jsonl", [
        {"prompt": "w60 w61"}, {"prompt": "w62", "answer": "w63|w64"},
        {"messages": [{"role": "user", "content": "w65"}, {"role": "assistant", "content": "w66 w67"}]}])
    c.forget.max_new_tokens = 5
    c.forget.replay_fraction = 0.25
    c.eval.metric = "exact,contains"
    c.eval.few_shot = 2
    c.eval.max_examples = 4
    return c


def lora_model():
    model = apply_lora(Llama(TINY.replace(vocab_size=128), rngs=nnx.Rngs(0)), 4, 8.0, rngs=nnx.Rngs(1))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
            var[...] = 0.3 * np.random.default_rng(len(path)).standard_normal(var[...].shape).astype(np.float32)
    return model


def test_evaluation_writes_the_report(run_config, tmp_path, capsys):
    workdir = tmp_path / "run"
    tok = tiny_tokenizer()
    model = lora_model()
    ev = Evaluation(eval_settings(run_config), tok, workdir, write=True)
    assert ev.has_task and len(ev.shots) == 2
    from ftjax.evaluation.base import base_view

    replies = ev.prepare(base_view(model))
    assert (workdir / CACHE_NAME).is_file() and len(replies.items) == 3

    from ftjax.data.replay import replay_mixture, write_replay_file

    spec = replay_mixture(run_config.data.train, write_replay_file(workdir / "replay.jsonl", replies), 0.25)
    sources = parse_sources(spec)
    assert [s.path for s in sources] == [run_config.data.train, str(workdir / "replay.jsonl")]
    assert sources[1].weight == pytest.approx(0.25) and sources[0].weight == pytest.approx(0.75)
    records = read_file(sources[1].path, Fields()).records
    assert records[2].messages[-1] == ("assistant", "w66 w67")  # the user's own reply is replayed as given
    assert [r.messages[-1][1] for r in records[:2]] == [r for r in replies.replies[:2] if r.strip()]
    assert tokenize_records(records, tok, loss_on="last_assistant").trained.any()

    logged = ev.track(model, None, step=4)
    assert set(logged) == {"task_exact", "task_contains", "kl_to_base", "retain_nll", "qa_accuracy"}
    assert logged["kl_to_base"] > 0
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0, **logged, "kl_to_base": 0.01}) + "\n"
                                           + json.dumps({"step": 4, "loss": 0.5, **logged}) + "\n")
    capsys.readouterr()
    report = ev.report(model, None, step=4)
    printed = capsys.readouterr().out
    for which in ("base", "prompted", "finetuned"):  # the tables, then one sample reply from each model
        assert f"  {which}:" in printed and repr(report["samples"][which]["reply"])[:40] in printed

    check_report(report, ["exact", "contains"])
    saved = json.loads((workdir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    rows = ("base", "prompted", "retrieval", "finetuned", "finetuned_retrieval")  # retrieval: from the train file
    assert set(contract_keys(saved)) == {
        *(f"task.{w}.{m}" for w in rows
          for m in ("exact", "contains", "eval_loss", "prompt_tokens", "seconds_per_query")),
        "forgetting.kl_to_base", "forgetting.retain_nll_base", "forgetting.retain_nll_finetuned",
        "forgetting.qa_accuracy_base", "forgetting.qa_accuracy_finetuned"}
    assert saved["forgetting"]["kl_to_base"] == pytest.approx(logged["kl_to_base"])  # the step-4 measurement
    assert saved["task"]["finetuned"]["exact"] == logged["task_exact"]
    assert set(saved["samples"]) == {*rows, "qa"}
    assert saved["task"]["base"]["prompt_tokens"] < saved["task"]["prompted"]["prompt_tokens"]  # + 2 examples
    assert all(saved["task"][w]["seconds_per_query"] > 0 for w in rows)
    assert saved["meta"]["few_shot"] == 2 and saved["meta"]["task_examples"] == 4
    md = (workdir / "report.md").read_text()
    assert "| fine-tuned" in md and "KL(base ‖ model)" in md
    assert "Run: 100 steps, lr 0.0001, batch 8 x 512 tokens, LoRA rank 16, report " in md  # its own time apart
    assert " min; checkpoint: step 4." in md
    phases = [p["phase"] for p in saved["meta"]["phases"]]  # where the report's time went, a row each in report.md
    assert any(p.startswith("base model on ") for p in phases) and any("-shot" in p for p in phases)
    assert all(f"| {p} | " in md for p in phases) and "| **report total** |" in md
    prose = [ln for ln in md.split("## Sample replies")[0].splitlines() if not ln.startswith("|")]  # not the replies
    assert not [ln for ln in prose if "{" in ln or "}" in ln]  # no f-string placeholder printed as its source
    from ftjax.evaluation.scorers import contains_answer

    for q in saved["samples"]["qa"]:  # the QA rows mark exactly the replies QA accuracy counts
        for which in ("base", "finetuned"):
            assert q[f"{which}_correct"] == bool(contains_answer(q[which], q["answer"]))
            cell = ("✓ " if q[f"{which}_correct"] else "") + " ".join(q[which].split()).replace("|", "\\|")
            assert cell in md
    assert (workdir / PLOT_NAME).is_file() and (workdir / BASELINES_NAME).is_file()
    mode = (workdir / "metrics.jsonl").stat().st_mode & 0o777  # as every other file: 0644 under umask 022
    for name in ("report.json", "report.md", BASELINES_NAME, CACHE_NAME, "replay.jsonl"):
        assert (workdir / name).stat().st_mode & 0o777 == mode, name

    # A quick report keeps the base rows (cached: read again at no cost) and drops the fine-tuned + retrieval row.
    run_config.eval.report = "quick"
    quick = Evaluation(eval_settings(run_config), tok, tmp_path / "quick", write=True).report(model, None, step=4)
    assert list(quick["task"]) == ["base", "prompted", "retrieval", "finetuned"]

    # The base's figures are cached: a second Evaluation reads them instead of generating.
    run_config.eval.report = "full"
    cached = json.loads((workdir / BASELINES_NAME).read_text())
    cached["results"]["base"]["scores"]["exact"] = 0.123
    (workdir / BASELINES_NAME).write_text(json.dumps(cached))
    again = Evaluation(eval_settings(run_config), tok, workdir, write=True).baselines(base_view(model))
    assert again["base"].scores["exact"] == 0.123


def test_base_results_are_shared_across_workdirs_by_content(run_config, tmp_path, monkeypatch, capsys):
    """A second workdir on the same base and data reuses the base, few-shot and + retrieval results (identical); a
    changed few-shot source file, seed, k or base content makes the rows that depend on it be computed again."""
    from ftjax.evaluation.base import base_view

    base_file = tmp_path / "base.gguf"  # the base's identity is its files' content, not its path
    base_file.write_bytes(b"weights v1")
    run_config.model.path = str(base_file)
    tok, model = tiny_tokenizer(), lora_model()
    first = Evaluation(eval_settings(run_config), tok, tmp_path / "run1", write=True).baselines(base_view(model))
    assert set(first) == {"base", "prompted", "retrieval"}
    computed = []
    real_task = Evaluation._task
    monkeypatch.setattr(Evaluation, "_task", lambda self, *a, **k: computed.append(k["which"])
                        or real_task(self, *a, **k))
    capsys.readouterr()
    second = Evaluation(eval_settings(run_config), tok, tmp_path / "run2", write=True).baselines(base_view(model))
    out = capsys.readouterr().out
    assert not computed and "base model and 2-shot prompted results: cached ($FTJAX_CACHE)" in out
    assert "base model + retrieval results: cached ($FTJAX_CACHE)" in out
    assert {k: v.to_json() for k, v in second.items()} == {k: v.to_json() for k, v in first.items()}

    def recomputed(workdir) -> set[str]:
        computed.clear()
        Evaluation(eval_settings(run_config), tok, workdir, write=True).baselines(base_view(model))
        return set(computed)

    every = {"base model", "base model prompted", "base model + retrieval"}
    with open(run_config.data.train, "a") as f:  # the few-shot and retrieval source changes (same path)
        f.write(json.dumps(chat("w90 w91", "w92")) + "\n")
    assert recomputed(tmp_path / "run3") == every
    run_config.seed = 7  # draws other fixed shots; retrieval's are chosen by similarity, not by the seed
    assert recomputed(tmp_path / "run4") == {"base model", "base model prompted"}
    run_config.eval.few_shot = 1  # k
    assert recomputed(tmp_path / "run5") == every
    base_file.write_bytes(b"weights v2")
    assert recomputed(tmp_path / "run6") == every
    assert recomputed(tmp_path / "run7") == set()  # and now that identity is cached in turn


def test_the_objectives_held_out_base_rows_are_shared_across_workdirs(run_config, tmp_path, monkeypatch, capsys):
    """The base's held-out rows (e.g. a DPO base's preference accuracy) are measured once per base content,
    held-out data and objective settings, then read from $FTJAX_CACHE by every other workdir, identical."""
    from ftjax.evaluation.base import base_view
    from ftjax.objectives import ReportRows

    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    tok, model = tiny_tokenizer(), lora_model()
    ids = np.arange(2, 12, dtype=np.int32)[None]
    measured = []

    def measure(m):  # the model's mean log-prob of a fixed sequence: differs between base and tuned
        logp = np.asarray(jax.nn.log_softmax(m(ids, np.arange(10, dtype=np.int32)[None], np.ones_like(ids))))[0, :-1]
        measured.append(1)
        return {"logp": float(np.mean(logp[np.arange(9), ids[0, 1:]]))}

    rows = ReportRows("toy", measure, lambda section: [], "toy log-prob", lambda m: {})
    base = base_view(model)
    first = Evaluation(eval_settings(run_config), tok, tmp_path / "run1", write=True, held_out=rows)._held_out_base(base)
    capsys.readouterr()
    again = Evaluation(eval_settings(run_config), tok, tmp_path / "run2", write=True, held_out=rows)._held_out_base(base)
    assert again == first and len(measured) == 1 and "toy log-prob: cached ($FTJAX_CACHE)" in capsys.readouterr().out
    assert first["logp"] != pytest.approx(measure(model)["logp"])  # the base, not the tuned model
    measured.clear()
    run_config.pref.beta = 0.5  # the objective's own settings are part of the key
    Evaluation(eval_settings(run_config), tok, tmp_path / "run3", write=True, held_out=rows)._held_out_base(base)
    run_config.data.seq_len = 64
    Evaluation(eval_settings(run_config), tok, tmp_path / "run4", write=True, held_out=rows)._held_out_base(base)
    run_config.optim.lr = 1.0  # how the run trains is not
    Evaluation(eval_settings(run_config), tok, tmp_path / "run5", write=True, held_out=rows)._held_out_base(base)
    assert len(measured) == 2


def test_report_contract_and_tables():
    report = {"task": {w: {"exact": 0.5, "eval_loss": 1.0} for w in ("base", "prompted", "finetuned")},
              "forgetting": {"kl_to_base": 0.2, "retain_nll_base": 0.3, "retain_nll_finetuned": 0.6},
              "meta": {"few_shot": 3}}
    check_report(report, ["exact"])
    with pytest.raises(ValueError, match="task.finetuned.json_valid"):
        check_report(report, ["exact", "json_valid"])
    text = format_tables(report)
    assert "base (3-shot)" in text and "50.0%" in text and "0.2000" in text


def test_replay_mixture_keeps_ratios():
    spec = replay_mixture("a.jsonl:3,b.jsonl:1", "r.jsonl", 0.2)
    got = {s.path: s.weight for s in parse_sources(spec)}
    assert got == pytest.approx({"a.jsonl": 0.6, "b.jsonl": 0.2, "r.jsonl": 0.2})


def test_progress_plot_needs_tracked_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert plot_progress(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0, "task_exact": s / 10, "kl_to_base": s / 100, "retain_nll": 1 + s / 10})
        + "\n" for s in (2, 4, 6)))
    assert plot_progress(tmp_path) == tmp_path / PLOT_NAME
    # The report's own points (the base at step 0, its step) join the log's where the log has none.
    points = [{"step": 0, "task_exact": 0.0}, {"step": 6, "task_exact": 9.0}, {"step": 8, "task_exact": 0.8}]
    assert [(r["step"], r.get("task_exact")) for r in progress_records(tmp_path, points)] == [
        (0, 0.0), (2, 0.2), (4, 0.4), (6, 0.6), (8, 0.8)]


def test_retain_batches_weight_only_the_replies(tmp_path):
    """The KL term's batches: prompt + reply rows in the train-step layout, weighted on the reply tokens
    (the end-of-turn token included) and nowhere else."""
    from ftjax.data.replay import BaseReplies
    from ftjax.data.replay import retain_iterator, write_replay_file
    from ftjax.data.retain import RetainItem

    tok = tiny_tokenizer()
    items = [RetainItem((("user", f"w{i} w{i + 1}"),)) for i in range(1, 7)]
    replies = BaseReplies(items, [], [], [f"w{i + 50} w{i + 51} w{i + 52}" for i in range(1, 7)], 8)
    path = write_replay_file(tmp_path / "replay.jsonl", replies)
    it = retain_iterator(path, tok, seq_len=32, batch_size=2, seed=0, prefetch=0)
    try:
        batch = next(it)
    finally:
        it.close()
    assert batch["input_ids"].shape == (2, 32)
    want = {f"w{i + 50} w{i + 51} w{i + 52} <|im_end|>" for i in range(1, 7)}
    for row in range(2):
        for seg in set(batch["segment_ids"][row].tolist()) - {0}:
            on = (batch["segment_ids"][row] == seg) & (batch["loss_weights"][row] > 0)
            assert tok.decode(batch["targets"][row][on]) in want
