"""The job page's chart geometry and results wording, as pure functions (the pages are tested over HTTP
and in the browser; these pin the edge cases)."""

from __future__ import annotations

import math

from app.web import results_view
from app.web.charts import history_charts, line_chart, nice_linear_axis, nice_log_axis


def test_axes_are_fitted_with_round_ticks_inside_their_bounds() -> None:
    low, high, ticks = nice_linear_axis(0.93, 0.98, floor=0.0, ceiling=1.0)
    assert 0.9 <= low < 0.93 and 0.98 < high <= 1.0
    assert ticks[0] >= low and ticks[-1] <= high and len(ticks) >= 3
    low, high, ticks = nice_log_axis(0.03, 2.4)
    assert low < 0.03 and high > 2.4 and {0.05, 0.1, 1.0} <= set(ticks)
    assert nice_linear_axis(0.5, 0.5)[0] < 0.5 < nice_linear_axis(0.5, 0.5)[1]  # a flat series


def test_log_scale_only_when_the_loss_spans_a_decade() -> None:
    wide = line_chart("t", "loss", ["1", "2", "3"], {"total_loss": ("total", [2.0, 0.5, 0.1])})
    narrow = line_chart("t", "loss", ["1", "2", "3"], {"total_loss": ("total", [0.9, 0.7, 0.6])})
    assert wide.log_scale and wide.y_label == "loss (log scale)"
    assert not narrow.log_scale and narrow.y_label == "loss"
    with_zero = line_chart("t", "loss", ["1", "2"], {"student_loss": ("label", [1.0, 0.0])})
    assert not with_zero.log_scale  # log of zero: stays linear


def test_progressive_jobs_label_stages_and_mark_the_delivered_epoch_of_the_last_stage() -> None:
    history = [
        {"stage": s, "epoch": e, "student_accuracy": 0.8 + 0.01 * (s + e), "total_loss": 1.0 / (s + e)}
        for s in (1, 2)
        for e in (1, 2, 3)
    ]
    baseline = [{"stage": 1, "epoch": e, "student_accuracy": 0.7 + 0.01 * e} for e in (1, 2, 3)]
    loss, accuracy = history_charts(
        history, baseline_history=baseline, selected=(2, 2), selected_by="best_validation"
    )
    assert [t.label for t in loss.x_ticks] == ["s1e1", "s1e2", "s1e3", "s2e1", "s2e2", "s2e3"]
    assert loss.x_label == "stage · epoch"
    series = {s.name: s for s in accuracy.series}
    assert series["student_accuracy"].count == 6 and series["baseline_accuracy"].count == 3
    (marker,) = accuracy.markers
    assert marker.label == "delivered: epoch 2 (best validation)"
    assert math.isclose(marker.x, accuracy.x_at(4))


def test_perplexity_charts_are_not_percentages_and_say_lower_is_better() -> None:
    history = [{"stage": 1, "epoch": e, "student_accuracy": 3.0 + 1 / e, "total_loss": 2.0} for e in (1, 2)]
    _, chart = history_charts(history, metric="perplexity", teacher_metric=2.9)
    assert chart.title == "Validation perplexity per epoch (lower is better)"
    assert not any(t.label.endswith("%") for t in chart.y_ticks)


def test_kd_gain_is_positive_when_kd_is_better_whatever_the_metric() -> None:
    accuracy = {"metric": "accuracy", "student_accuracy": 0.9861, "baseline_accuracy": 0.9583}
    assert results_view.kd_comparison(accuracy) == (
        "KD vs labels-only baseline: +2.78 points of test accuracy (KD better)"
    )
    worse = {"metric": "accuracy", "best_student_accuracy": 0.95, "baseline_accuracy": 0.96}
    assert "-1.00 points of test accuracy (KD worse)" in str(results_view.kd_comparison(worse))
    perplexity = {"metric": "perplexity", "student_accuracy": 3.0, "baseline_accuracy": 3.5, "kd_gain": -50.0}
    assert results_view.kd_comparison(perplexity) == (
        "KD vs labels-only baseline: +0.5 test perplexity (KD better, lower is better)"
    )
    assert results_view.kd_comparison({"metric": "accuracy", "student_accuracy": 0.9}) is None


def test_the_headline_falls_back_to_the_best_validation_figure_of_older_results() -> None:
    old = results_view.build(
        {"metric": "accuracy", "best_student_accuracy": 0.9861, "final_student_accuracy": 0.97}
    )
    assert old.headline.value == "98.61%" and "best validation accuracy" in old.headline.selected
    new = results_view.build(
        {"metric": "accuracy", "student_accuracy": 0.9889, "selected_by": "last", "selected_epoch": 100}
    )
    assert new.headline.value == "98.89%" and new.headline.selected.endswith("the last epoch (epoch 100)")


def _searched(**fields: object) -> dict[str, object]:
    trials = [
        {
            "trial": 1,
            "compression_ratio": 0.02,
            "parameters": 15_000,
            "validation_retention": 0.93,
            "test_retention": 0.95,
            "meets_target": False,
            "epochs": 4,
            "seconds": 1.0,
        },
        {
            "trial": 2,
            "compression_ratio": 0.08,
            "parameters": 60_000,
            "validation_retention": 0.97,
            "test_retention": 0.98,
            "meets_target": True,
            "epochs": 4,
            "seconds": 1.0,
        },
    ]
    return {
        "metric": "accuracy",
        "target_retention": 0.95,
        "target_met": True,
        "accuracy_retention": 0.98,
        "compressed_parameters": 60_000,
        "trials": trials,
        "search": {
            "target_retention": 0.95,
            "status": "bracketed",
            "chosen_trial": 2,
            "trial_epochs": 4,
            "trials_exact": True,
            "seconds": 2.0,
            "teacher_validation_accuracy": 0.98,
        },
    } | fields


def test_size_curve_orders_trials_by_size_draws_the_target_and_marks_the_delivered_size() -> None:
    from app.web.search_view import build, size_curve_chart

    chart = size_curve_chart(_searched())
    assert chart is not None and chart.x_label == "student parameters (log scale)"
    validation = next(s for s in chart.series if s.name == "validation_retention")
    (x1, y1), (x2, y2) = [tuple(map(float, p.split(","))) for p in validation.points.split()]
    assert x1 < x2 and y2 < y1  # bigger student further right, higher retention higher up (smaller y)
    target = next(s for s in chart.series if s.name == "target")
    target_y = float(target.points.split()[0].split(",")[1])
    assert y2 < target_y < y1  # the target between the trial that misses and the one that meets it
    assert len(chart.markers) == 1 and "60,000 parameters trained fully" in chart.markers[0].label
    assert size_curve_chart({"metric": "accuracy"}) is None  # a job without a search draws nothing

    missed = build(_searched(target_met=False, accuracy_retention=0.9))
    assert missed.verdict is not None and "NOT met" in missed.verdict and "best size found" in missed.verdict
    assert [chosen for chosen, _ in missed.trial_rows] == [False, True]
    assert build({"metric": "accuracy"}).empty


def test_seed_spread_rows_name_metric_and_unit() -> None:
    from app.web.search_view import build

    spread = {"mean": 0.5, "std": 0.1, "min": 0.4, "max": 0.6}
    view = build(
        {
            "metric": "perplexity",
            "kd_gain_unit": "perplexity",
            "seed_summary": {
                "seeds": [0, 1],
                "delivered_seed": 0,
                "student_accuracy": spread,
                "accuracy_retention": spread,
                "kd_gain": {"mean": -1.5, "std": 0.5, "min": -2, "max": -1},
            },
        }
    )
    rows = {row[0]: row[1:] for row in view.seed_rows}
    assert rows["KD student perplexity"] == ["0.500", "0.100", "0.400", "0.600"]
    assert rows["KD vs labels-only (perplexity, positive = KD better)"] == ["-1.50", "0.50", "-2.00", "-1.00"]
    assert view.seed_title is not None and "seed 0's" in view.seed_title
