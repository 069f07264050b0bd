"""The job page's retention search and seed spread: the accuracy-vs-size curve and their tables.

The curve puts every trial at its parameter count (log scale) and its validation retention (what the
search decided on), with the test retention dashed beside it, the target as a horizontal line and the size
trained fully marked. Torch-free: it reads the stored results document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from app.web.charts import (
    BASELINE_COLOUR,
    COLOURS,
    REFERENCE_COLOUR,
    LineChart,
    Marker,
    Series,
    Tick,
    nice_linear_axis,
    nice_log_axis,
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _percent(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return _percent(value) if metric == "accuracy" else f"{value:.3f}"


def _count_label(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def size_curve_chart(results: dict[str, Any]) -> LineChart | None:
    """Validation (and test) retention against student parameters for every trial; None without trials."""
    search = results.get("search") or {}
    trials = [
        t
        for t in results.get("trials") or []
        if isinstance(t, dict)
        and (_number(t.get("parameters")) or 0) > 0
        and _number(t.get("validation_retention")) is not None
    ]
    target = _number(search.get("target_retention"))
    if not trials or target is None:
        return None
    metric = str(results.get("metric") or "accuracy")
    trials.sort(key=lambda t: float(t["parameters"]))
    sizes = [float(t["parameters"]) for t in trials]
    validation = [float(t["validation_retention"]) for t in trials]
    test = [_number(t.get("test_retention")) for t in trials]
    delivered = _number(results.get("accuracy_retention"))
    delivered_size = _number(results.get("compressed_parameters"))
    values = [*validation, *(v for v in test if v is not None), target]
    if delivered is not None:
        values.append(delivered)
    chart = LineChart(
        title=f"Retention of the teacher's {metric} vs student size (target {_percent(target, 1)})",
        y_label=f"retention of the teacher's {metric}",
        x_label="student parameters (log scale)",
    )
    size_low = min([*sizes, *([delivered_size] if delivered_size else [])])
    size_high = max([*sizes, *([delivered_size] if delivered_size else [])])
    if math.isclose(size_low, size_high):
        size_low, size_high = size_low / 2, size_high * 2
    x_low, x_high, x_ticks = nice_log_axis(size_low, size_high)
    low, high, y_ticks = nice_linear_axis(min(values), max(values), floor=0.0)
    chart.low, chart.high, chart.points = low, high, len(trials)

    def x_at(size: float) -> float:
        share = (math.log10(size) - math.log10(x_low)) / (math.log10(x_high) - math.log10(x_low))
        return chart.left + (chart.right - chart.left) * share

    def coords(points: list[tuple[float, float | None]]) -> tuple[str, int]:
        kept = [(x, y) for x, y in points if y is not None]
        return " ".join(f"{x_at(x):.1f},{chart.y_at(y):.1f}" for x, y in kept), len(kept)

    points, count = coords(list(zip(sizes, validation, strict=True)))
    chart.series.append(
        Series(
            "validation_retention",
            "trials: validation retention (decides)",
            COLOURS[0],
            points,
            count,
            dots=True,
        )
    )
    points, count = coords(list(zip(sizes, test, strict=True)))
    if count:
        chart.series.append(
            Series(
                "test_retention",
                "trials: test retention (reported)",
                BASELINE_COLOUR,
                points,
                count,
                True,
                True,
            )
        )
    y = f"{chart.y_at(target):.1f}"
    chart.series.append(
        Series(
            "target",
            f"target {_percent(target, 1)}",
            REFERENCE_COLOUR,
            f"{chart.left},{y} {chart.right},{y}",
            2,
            True,
        )
    )
    if delivered is not None and delivered_size:
        met = results.get("target_met")
        chart.markers.append(
            Marker(
                x_at(delivered_size),
                chart.y_at(delivered),
                f"delivered: {int(delivered_size):,} parameters trained fully, test retention "
                f"{_percent(delivered)} ({'meets' if met else 'misses'} the target)",
            )
        )
    chart.x_ticks = [Tick(x_at(t), _count_label(t)) for t in x_ticks]
    chart.y_ticks = [Tick(chart.y_at(t), _percent(t, 1).replace(".0%", "%")) for t in y_ticks]
    return chart


@dataclass(frozen=True)
class SearchView:
    """The tables the job page shows under the results: the trials and the spread over seeds."""

    verdict: str | None = None  # "Target ... met" / "NOT met"
    target_met: bool | None = None
    notes: list[str] = field(default_factory=list)
    trial_columns: list[str] = field(default_factory=list)
    trial_rows: list[tuple[bool, list[str]]] = field(default_factory=list)  # (chosen, cells)
    seed_title: str | None = None
    seed_rows: list[list[str]] = field(default_factory=list)  # figure, mean, std, min, max

    @property
    def empty(self) -> bool:
        return self.verdict is None and not self.seed_rows


def build(results: dict[str, Any]) -> SearchView:
    """The search verdict, trials table and seed spread of a results document (empty for other jobs)."""
    metric = str(results.get("metric") or "accuracy")
    search = results.get("search") or {}
    target = _number(results.get("target_retention"))
    verdict, met, notes = None, None, []
    columns: list[str] = []
    rows: list[tuple[bool, list[str]]] = []
    if target is not None:
        met = bool(results.get("target_met"))
        verdict = (
            f"Target retention {_percent(target)}: {'met' if met else 'NOT met'} — "
            "the delivered student keeps "
            f"{_percent(_number(results.get('accuracy_retention')))} of the teacher's test {metric}"
            + ("" if met else " (the best size found is delivered)")
        )
        notes.append(
            f"Search {search.get('status', '?')} after {len(results.get('trials') or [])} trial(s) in "
            f"{_number(search.get('seconds')) or 0:.1f} s; sizes chosen on the validation split (teacher "
            f"{_metric_text(_number(search.get('teacher_validation_accuracy')), metric)}), test figures "
            "reported only."
        )
        notes.append(
            f"Each trial trained {search.get('trial_epochs')} epoch(s)"
            + (
                ", the job's own epochs."
                if search.get("trials_exact")
                else ", fewer than the job's; figures as measured, not extrapolated."
            )
        )
        columns = [
            "trial",
            "size (share of teacher)",
            "parameters",
            f"validation {metric}",
            "validation retention",
            f"test {metric}",
            "meets target",
            "latency, 1 (ms)",
            "latency, 64 (ms)",
            "seconds",
        ]
        chosen = search.get("chosen_trial")
        for trial in results.get("trials") or []:
            latency = trial.get("latency_ms") or {}
            b1, b64 = _number(latency.get("batch_1")), _number(latency.get("batch_64"))
            rows.append(
                (
                    trial.get("trial") == chosen,
                    [
                        str(trial.get("trial")),
                        _percent(_number(trial.get("compression_ratio")), 3),
                        f"{int(trial.get('parameters') or 0):,}",
                        _metric_text(_number(trial.get("validation_accuracy")), metric),
                        _percent(_number(trial.get("validation_retention"))),
                        _metric_text(_number(trial.get("test_accuracy")), metric),
                        "yes" if trial.get("meets_target") else (trial.get("error") or "no"),
                        "n/a" if b1 is None else f"{b1:.3f}",
                        "n/a" if b64 is None else f"{b64:.3f}",
                        f"{_number(trial.get('seconds')) or 0:.1f}",
                    ],
                )
            )
    seed_title, seed_rows = None, []
    summary = results.get("seed_summary") or {}
    if summary:
        seeds = summary.get("seeds") or []
        seed_title = (
            f"Over {len(seeds)} seeds ({', '.join(str(s) for s in seeds)}), test split; "
            f"the delivered student is seed {summary.get('delivered_seed')}'s"
            + (" (best on validation)" if summary.get("delivered_by") == "best_validation" else "")
        )
        unit = results.get("kd_gain_unit") or "points"
        for label, key, kind in (
            (f"KD student {metric}", "student_accuracy", "metric"),
            (f"Retention of the teacher's {metric}", "accuracy_retention", "percent"),
            (f"Labels-only baseline {metric}", "baseline_accuracy", "metric"),
            (f"KD vs labels-only ({unit}, positive = KD better)", "kd_gain", "gain"),
        ):
            spread = summary.get(key)
            if not spread:
                continue

            def text(value: Any, *, signed: bool, kind: str = kind) -> str:
                number = _number(value)
                if kind == "metric":
                    return _metric_text(number, metric)
                if kind == "percent":
                    return _percent(number)
                return "n/a" if number is None else (f"{number:+.2f}" if signed else f"{number:.2f}")

            seed_rows.append(
                [
                    label,
                    text(spread.get("mean"), signed=True),
                    text(spread.get("std"), signed=False),
                    text(spread.get("min"), signed=True),
                    text(spread.get("max"), signed=True),
                ]
            )
    return SearchView(
        verdict=verdict,
        target_met=met,
        notes=notes,
        trial_columns=columns,
        trial_rows=rows,
        seed_title=seed_title,
        seed_rows=seed_rows,
    )
