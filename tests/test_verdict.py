"""The report's verdict sentence, rendered from synthetic task tables: retrieval best, fine-tuned best, a tie."""

import json

import pytest

from ftjax.evaluation.verdict import Row, ratio, rows_of, verdict


def _report(scores, tokens, seconds):
    """A report.json's task section with the five rows (which -> score, prompt tokens, seconds per query)."""
    names = ("base", "prompted", "retrieval", "finetuned", "finetuned_retrieval")
    return {"meta": {"few_shot": 3},
            "task": {w: {"exact": s, "eval_loss": 1.0, "prompt_tokens": t, "seconds_per_query": g}
                     for w, s, t, g in zip(names, scores, tokens, seconds)}}


def test_fine_tuned_best():
    report = _report([0.10, 0.54, 0.50, 0.98, 0.97], [40, 360, 420, 40, 420], [0.20, 0.60, 0.70, 0.20, 0.70])
    assert verdict(rows_of(report, "exact")) == (
        "fine-tuned beats the best prompt (base 3-shot) by 44 points (98% vs 54%), at 1/9 the prompt tokens and "
        "1/3 the generation time per query.")


def test_retrieval_best():
    report = _report([0.02, 0.05, 0.81, 0.31, 0.79], [30, 250, 600, 30, 600], [0.10, 0.30, 0.45, 0.10, 0.45])
    assert verdict(rows_of(report, "exact")) == (
        "base + retrieval beats fine-tuned + retrieval by 2 points (81% vs 79%) without training, at about the "
        "same prompt tokens and about the same generation time per query.")
    del report["task"]["finetuned_retrieval"]  # a run without the tuned + retrieval row
    assert verdict(rows_of(report, "exact")) == (
        "base + retrieval beats fine-tuned by 50 points (81% vs 31%) without training, at 20× the prompt tokens "
        "and 4.5× the generation time per query.")


def test_tie_names_the_cheaper():
    report = _report([0.20, 0.541, 0.40, 0.538, None], [40, 360, 420, 40, None], [0.2, 0.6, 0.7, 0.3, None])
    assert verdict(rows_of(report, "exact")) == (
        "fine-tuned ties the best prompt (base 3-shot) at 54%, and needs 1/9 the prompt tokens and 1/2 the "
        "generation time per query.")


def test_unmeasured_costs_and_rows():
    rows = [Row("base 0-shot", 0.25), Row("fine-tuned", 0.75, tuned=True)]
    assert verdict(rows) == "fine-tuned beats the best prompt (base 0-shot) by 50 points (75% vs 25%)."
    assert verdict(rows[:1]) is None and verdict([Row("fine-tuned", float("nan"), tuned=True), rows[0]]) is None
    assert [ratio(1, 9), ratio(9, 1), ratio(100, 90), ratio(25, 1), ratio(None, 1)] == [
        "1/9", "9.0×", "about the same", "25×", None]


def _results(scores, tokens, seconds):
    """TaskResults as the evaluation gives them (which -> exact score, prompt tokens, seconds per query)."""
    from ftjax.evaluation.task import TaskResult

    names = ("base", "prompted", "retrieval", "finetuned", "finetuned_retrieval")
    return {w: TaskResult({"exact": s, "json_valid": 1.0}, 0.5, 10, ["r"], [{"exact": s, "json_valid": 1.0}],
                          [(("user", "q"),)], ["a"], prompt_tokens=t, seconds_per_query=g)
            for w, s, t, g in zip(names, scores, tokens, seconds) if s is not None}


@pytest.mark.parametrize("scores, tokens, seconds, sentence", [
    ([0.02, 0.05, 0.81, 0.31, None], [30, 250, 600, 30, None], [0.1, 0.3, 0.45, 0.1, None],
     "base + retrieval beats fine-tuned by 50 points (81% vs 31%) without training, at 20× the prompt tokens and "
     "4.5× the generation time per query."),
    ([0.10, 0.54, 0.50, 0.98, 0.97], [40, 360, 420, 40, 420], [0.2, 0.6, 0.7, 0.2, 0.7],
     "fine-tuned beats the best prompt (base 3-shot) by 44 points (98% vs 54%), at 1/9 the prompt tokens and 1/3 "
     "the generation time per query."),
    ([0.20, 0.541, 0.40, 0.538, 0.3], [40, 360, 420, 40, 420], [0.2, 0.6, 0.7, 0.3, 0.7],
     "fine-tuned ties the best prompt (base 3-shot) at 54%, and needs 1/9 the prompt tokens and 1/2 the generation "
     "time per query."),
])
def test_the_report_ends_with_the_verdict_of_its_own_figures(tmp_path, scores, tokens, seconds, sentence):
    """report.json's `verdict` and report.md's last section are the sentence computed from the table's figures
    (the first eval.metric score), and the table shows each row's score, prompt tokens and seconds per query."""
    from ftjax.evaluation.report import build_report, write_report

    report = build_report(_results(scores, tokens, seconds), meta={"few_shot": 3, "metric": "person_json"})
    assert report["verdict"] == sentence
    write_report(tmp_path, report, echo=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["verdict"] == sentence == verdict(rows_of(saved, "exact"))
    md = (tmp_path / "report.md").read_text()
    assert md.endswith(f"## Verdict\n\n{sentence}\n\n")
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    shown = ["base (0-shot)", "base (3-shot)", "base + retrieval", "fine-tuned", "fine-tuned + retrieval"]
    assert header == ["task"] + [s for s, x in zip(shown, scores) if x is not None or s in shown[:2] + shown[3:4]]
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")[1:]] for ln in table[1:]}
    measured = [i for i, x in enumerate(scores) if x is not None]
    assert cells["exact (10 examples)"] == [f"{100 * scores[i]:.1f}%" for i in measured]
    assert cells["prompt tokens / query"] == [f"{tokens[i]:.0f}" for i in measured]
    assert cells["generation s / query"] == [f"{seconds[i]:.3f}" for i in measured]
