"""loss.png's data: a train loss for every step from the logged lines' step_losses, eval points where measured."""

import json

from ftjax.metrics.plot import loss_curve, plot_losses


def test_every_step_has_a_train_point_and_evals_stay_where_measured(tmp_path):
    records = [{"step": 3, "loss": 2.0, "step_losses": [4.0, 3.0, 2.0]},
               {"step": 5, "loss": 1.0, "step_losses": [1.5, 1.0], "eval_loss": 1.2},
               {"step": 6, "loss": 0.5, "step_losses": [0.5], "eval_loss": 0.6}]
    train, evals = loss_curve(records)
    assert train == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.5), (5, 1.0), (6, 0.5)]
    assert evals == [(5, 1.2), (6, 0.6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_losses(tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lines_without_step_losses_still_give_their_logged_point():
    train, evals = loss_curve([{"step": 10, "loss": 0.25}, {"step": 20, "eval_loss": 0.3}])
    assert train == [(10, 0.25)] and evals == [(20, 0.3)]
