"""A finished job's results in words, with units and directions, for the job page.

The headline is `student_accuracy`: the delivered student's metric on the test split, with `selected_by`
saying how its epoch was chosen. Results written before those fields existed fall back to what that
engine delivered (the best-validation epoch, `best_student_accuracy`). Every comparison names its metric
and says which way is better; a lower-is-better metric (perplexity) says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MISSING = "n/a"
SELECTED_BY_WORDS = {
    "best_validation": "the epoch with the best validation {metric}",
    "last": "the last epoch",
}


@dataclass(frozen=True)
class Row:
    """One line of a results table: what it is, its value(s) with unit, and an optional explanation."""

    key: str  # the results field, for tests and tooltips (data-key)
    label: str
    value: str
    teacher: str = ""
    hint: str = ""


@dataclass(frozen=True)
class Headline:
    label: str  # e.g. "Student accuracy (test)"
    value: str  # e.g. "98.61%"
    selected: str  # e.g. "delivered: the epoch with the best validation accuracy (epoch 7)"
    comparisons: list[str]


@dataclass(frozen=True)
class ResultsView:
    headline: Headline
    table: list[Row]  # teacher vs student
    summary: list[Row]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return MISSING
    return f"{value * 100:.2f}%" if metric == "accuracy" else f"{value:.4g}"


def _percent(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value * 100:.{digits}f}%"


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else MISSING


def _plain(value: float | None, unit: str, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}g} {unit}".rstrip()


def metric_direction(results: dict[str, Any]) -> str:
    """'higher_is_better' or 'lower_is_better': stored by the engine, else implied by the metric."""
    stored = results.get("metric_direction")
    if stored in ("higher_is_better", "lower_is_better"):
        return str(stored)
    return "lower_is_better" if results.get("metric") == "perplexity" else "higher_is_better"


def delivered_metric(results: dict[str, Any]) -> float | None:
    """The delivered student's test metric (`student_accuracy`; older results: the best-validation one)."""
    value = _number(results.get("student_accuracy"))
    return value if value is not None else _number(results.get("best_student_accuracy"))


def selected_by(results: dict[str, Any]) -> str:
    # Engines before `selected_by` always delivered the best-validation epoch.
    return str(results.get("selected_by") or "best_validation")


def kd_gain(results: dict[str, Any]) -> tuple[float, str] | None:
    """KD vs labels-only, signed so that positive means KD is better, with its unit.

    The engine's `kd_gain` when it states its unit (`kd_gain_unit`); older results computed it as
    100 * (student - baseline) whatever the metric, so it is recomputed from the two figures.
    """
    student, baseline = delivered_metric(results), _number(results.get("baseline_accuracy"))
    unit = results.get("kd_gain_unit")
    stored = _number(results.get("kd_gain"))
    if unit in ("points", "perplexity") and stored is not None:
        return stored, str(unit)
    if student is None or baseline is None:
        return None
    if metric_direction(results) == "lower_is_better":
        return baseline - student, str(results.get("metric") or "perplexity")
    return 100.0 * (student - baseline), "points"


def kd_comparison(results: dict[str, Any]) -> str | None:
    """E.g. 'KD vs labels-only baseline: +2.78 points of test accuracy (KD better)'."""
    gain = kd_gain(results)
    if gain is None:
        return None
    value, unit = gain
    metric = str(results.get("metric") or "accuracy")
    verdict = "KD better" if value > 0 else "KD worse" if value < 0 else "no difference"
    if unit == "points":
        amount = f"{value:+.2f} points of test {metric}"
    else:
        amount = f"{value:+.3g} test {metric}"
        verdict += ", lower is better" if metric_direction(results) == "lower_is_better" else ""
    return f"KD vs labels-only baseline: {amount} ({verdict})"


def _selected_text(results: dict[str, Any], metric: str) -> str:
    how = SELECTED_BY_WORDS.get(selected_by(results), selected_by(results)).format(metric=metric)
    epoch = results.get("selected_epoch")
    if epoch is None:
        stages = results.get("stages") or []
        epoch = stages[-1].get("best_epoch") if stages and isinstance(stages[-1], dict) else None
        epoch = epoch if selected_by(results) == "best_validation" else None
    return f"the delivered student: {how}" + (f" (epoch {epoch})" if epoch is not None else "")


def build(results: dict[str, Any]) -> ResultsView:
    """The job page's headline, teacher-vs-student table and summary rows from a results document."""
    metric = str(results.get("metric") or "accuracy")
    direction = metric_direction(results)
    lower = direction == "lower_is_better"
    name = "Student accuracy" if metric == "accuracy" else f"Student {metric}"
    student = delivered_metric(results)
    teacher = _number(results.get("teacher_accuracy"))
    retention = _number(results.get("accuracy_retention"))
    comparisons = []
    if teacher is not None:
        comparisons.append(f"teacher: {_metric_text(teacher, metric)} test {metric}")
    if retention is not None:
        comparisons.append(
            f"retention: {_percent(retention)}"
            + (
                f" (the teacher's test {metric} / the student's; {metric}: lower is better)"
                if lower
                else f" of the teacher's test {metric}"
            )
        )
    gain = kd_comparison(results)
    if gain is not None:
        comparisons.append(gain)
    headline = Headline(
        label=f"{name} (test{', lower is better' if lower else ''})",
        value=_metric_text(student, metric),
        selected=_selected_text(results, metric),
        comparisons=comparisons,
    )

    sizes = results.get("model_size_mb") or {}
    latency = results.get("latency_ms") or {}
    table = [
        Row(
            "teacher_accuracy/student_accuracy",
            f"Test {metric}" + (" (lower is better)" if lower else ""),
            _metric_text(student, metric),
            _metric_text(teacher, metric),
            "Student: the delivered weights",
        ),
        Row(
            "original_parameters/compressed_parameters",
            "Parameters",
            _count(results.get("compressed_parameters")),
            _count(results.get("original_parameters")),
        ),
        Row(
            "model_size_mb",
            "Size of the weights (MiB)",
            _plain(_number(sizes.get("student")), "", 4),
            _plain(_number(sizes.get("teacher")), "", 4),
        ),
    ]
    for batch, words in (("batch_1", "one example"), ("batch_64", "a batch of 64")):
        table.append(
            Row(
                f"latency_ms.{batch}",
                f"Latency, {words} (ms)",
                _plain(_number((latency.get("student") or {}).get(batch)), "", 3),
                _plain(_number((latency.get("teacher") or {}).get(batch)), "", 3),
                f"Milliseconds per forward pass on {results.get('device', 'the job device')}",
            )
        )

    summary: list[Row] = []

    def add(key: str, label: str, value: str | None, hint: str = "") -> None:
        if value is not None and value != MISSING:
            summary.append(Row(key, label, value, hint=hint))

    add(
        "compression_ratio",
        "Student size (share of the teacher's parameters)",
        _percent(_number(results.get("compression_ratio"))),
        f"target {_percent(_number(results.get('target_compression')))}"
        if results.get("target_retention") is None
        else "searched: the smallest keeping "
        f"{_percent(_number(results.get('target_retention')))} of the teacher",
    )
    add("parameter_reduction", "Parameters removed", _percent(_number(results.get("parameter_reduction"))))
    add("memory_savings", "Memory saved (weights)", _percent(_number(results.get("memory_savings"))))
    speedup = _number(results.get("inference_speedup"))
    add(
        "inference_speedup",
        "Inference speed-up (batch of 64)",
        None if speedup is None else f"{speedup:.2f}x faster",
        "Teacher latency / student latency",
    )
    add(
        "cost_savings",
        "Inference cost saved (estimate)",
        _percent(_number(results.get("cost_savings"))),
        "1 - 1 / speed-up: compute time per prediction",
    )
    add(
        "accuracy_retention",
        f"Retention of the teacher's test {metric}",
        _percent(retention),
        f"teacher / student ({metric}: lower is better)" if lower else "student / teacher",
    )
    add(
        "final_student_accuracy",
        f"Student at the last epoch, test {metric}",
        _metric_text(_number(results.get("final_student_accuracy")), metric),
    )
    add(
        "best_student_accuracy",
        f"Student at the best-validation epoch, test {metric}",
        _metric_text(_number(results.get("best_student_accuracy")), metric),
    )
    add(
        "baseline_accuracy",
        f"Labels-only baseline student, test {metric}",
        None
        if results.get("baseline_accuracy") is None
        else _metric_text(_number(results.get("baseline_accuracy")), metric),
        "Same student trained on the labels alone, no teacher",
    )
    if gain is not None:
        add("kd_gain", "KD vs labels-only baseline", gain.split(": ", 1)[1])
    add("training_seconds", "Training time", _plain(_number(results.get("training_seconds")), "s", 3))
    add("total_seconds", "Whole job", _plain(_number(results.get("total_seconds")), "s", 3))
    return ResultsView(headline=headline, table=table, summary=summary)
