"""report.md for a reader: no empty section, each forgetting figure explained with its better direction, and
the training and report times apart."""

from __future__ import annotations

from ftjax.evaluation.report import build_report, write_report
from ftjax.objectives.preference import preference_table

PREFERENCE = {"base": {"accuracy": 0.0, "margin": -3.0, "pairs": 4}, "finetuned": {"accuracy": 1.0, "margin": 2.0,
                                                                                    "pairs": 4}}


def test_a_preference_report_has_no_empty_sample_heading_and_says_what_its_figures_mean(tmp_path):
    meta = {"step": 4, "model": "m", "method": "lora", "objective": "dpo",
            "run": {"steps": 4, "lr": 1e-3, "batch_size": 8, "seq_len": 256, "wall_s": 90.0, "report_s": 300.0}}
    held_out = {"key": "preference", "section": PREFERENCE, "rows": preference_table(PREFERENCE),
                "about": "preference accuracy on held-out pairs"}  # as the preference objective's report rows give
    write_report(tmp_path, build_report({}, meta=meta, held_out=held_out), echo=False)
    md = (tmp_path / "report.md").read_text()
    assert "## Sample replies" not in md
    lines = md.splitlines()
    headings = [i for i, ln in enumerate(lines) if ln.startswith("#")]
    for i, j in zip(headings, headings[1:] + [len(lines)]):  # every heading has content before the next one
        assert any(ln.strip() for ln in lines[i + 1:j]), lines[i]
    for figure, better in (("retain NLL", "lower is better"), ("KL(base ‖ model)", "lower is better"),
                           ("general QA accuracy", "higher is better")):
        line = next(ln for ln in lines if ln.startswith(f"- *{figure}*"))
        assert better in line, line
    assert "training 1.5 min, report 5.0 min" in md


def test_progress_png_draws_each_forgetting_figure_on_its_own_scale():
    from ftjax.evaluation.progress import panels

    records = [{"step": s, "task_exact": s / 10, "qa_accuracy": 0.5, "kl_to_base": s / 100, "retain_nll": 1 + s / 10}
               for s in (2, 4)]
    layout = panels(records)
    assert [names for _, _, names in layout] == [["task_exact", "qa_accuracy"], ["kl_to_base"], ["retain_nll"]]
    assert all(("lower is better" in t) == (names != ["task_exact", "qa_accuracy"]) for t, _, names in layout)
    assert [names for _, _, names in panels([{"step": 1, "kl_to_base": 0.1}])] == [["kl_to_base"]]


def test_the_timing_table_adds_up_to_the_report_total():
    from ftjax.evaluation import phase_times

    start = phase_times.mark()
    phase_times.record("base model on 50 eval examples", 12.4)
    phase_times.record("forgetting metrics", 30.0)
    rows = phase_times.table(phase_times.since(start), total_s=50.0)
    assert rows[2:4] == ["| phase | seconds |", "|---|---|"]
    assert rows[4:8] == ["| base model on 50 eval examples | 12 |", "| forgetting metrics | 30 |",
                         "| other (loading, writing) | 8 |", "| **report total** | **50** |"]
    assert phase_times.table([]) == []
