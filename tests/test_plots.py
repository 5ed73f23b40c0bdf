"""The Train/Runs charts: smoothed per-step series, the odds-ratio share of the loss, validation markers."""

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("altair")

from orpo_local.ui.plots import chart, frames, smooth  # noqa: E402


def rows():
    train = [{"step": s, "split": "train", "loss": 2.0 + 0.1 * s, "nll_loss": 1.5, "rewards/accuracies": float(s % 2),
              "logps/chosen": -1.0, "logps/rejected": -1.2, "log_odds_chosen": 0.3} for s in (1, 2, 3)]
    evals = [{"step": s, "split": "eval", "loss": 2.0, "nll_loss": 1.9, "rewards/accuracies": 0.25 * s,
              "logps/chosen": -1.0, "logps/rejected": -1.0 - 0.1 * s, "log_odds_chosen": 0.1} for s in (0, 3)]
    return train + evals


def test_smoothing_is_a_debiased_running_average():
    # weight 0.8: sums 0.2, 0.16, 0.328 over weights 0.2, 0.36, 0.488
    assert smooth([1.0, 0.0, 1.0]) == pytest.approx([1.0, 0.16 / 0.36, (0.2 + 0.8 * 0.16) / 0.488])
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])


def test_frames_hold_raw_points_a_smoothed_line_and_validation_markers():
    f = frames(rows())
    acc = f["plot.accuracy"]
    raw = acc[(acc.series == "accuracy") & (acc.kind == "step")]
    assert list(raw.step) == [1, 2, 3] and list(raw.value) == [1.0, 0.0, 1.0]
    line = acc[(acc.series == "accuracy") & (acc.kind == "smoothed")]
    assert list(line.value) == pytest.approx(smooth([1.0, 0.0, 1.0]))
    marks = acc[(acc.series == "accuracy") & (acc.kind == "eval")]
    assert list(marks.step) == [0, 3] and list(marks.value) == [0.0, 0.75]  # step 0: the base model
    share = acc[(acc.series == "λ·OR share of loss") & (acc.kind == "step")]
    assert list(share.value) == pytest.approx([0.6 / 2.1, 0.7 / 2.2, 0.8 / 2.3])  # (loss - NLL) / loss
    margin = f["plot.margin"]
    assert list(margin[(margin.series == "logp margin") & (margin.kind == "eval")].value) == pytest.approx([0.0, 0.3])


def test_the_chart_draws_points_lines_and_markers():
    spec = chart(frames(rows())["plot.loss"]).to_dict()
    marks = [layer["mark"]["type"] for layer in spec["layer"][:2]] + [m["mark"]["type"] for m in spec["layer"][2]["layer"]]
    assert marks == ["circle", "line", "line", "point"]
    assert chart(frames([])["plot.loss"]).to_dict()["layer"]  # an empty run still draws an (empty) chart
