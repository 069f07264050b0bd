"""Line charts as inline SVG geometry (computed here, drawn by the templates): no JavaScript, no CDN."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WIDTH = 560
HEIGHT = 240
MARGIN_LEFT = 56
MARGIN_RIGHT = 16
MARGIN_TOP = 16
MARGIN_BOTTOM = 36
COLOURS = ("#2563eb", "#dc2626", "#059669", "#9333ea")


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    points: str  # "x1,y1 x2,y2 ..." for <polyline points>
    count: int
    dashed: bool = False


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass
class LineChart:
    """Everything a template needs to draw one chart: plot box, polylines, axis ticks."""

    title: str
    y_label: str
    width: int = WIDTH
    height: int = HEIGHT
    left: int = MARGIN_LEFT
    top: int = MARGIN_TOP
    right: int = WIDTH - MARGIN_RIGHT
    bottom: int = HEIGHT - MARGIN_BOTTOM
    series: list[Series] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)


def _nice_range(low: float, high: float) -> tuple[float, float]:
    if math.isclose(low, high):
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    # Losses and accuracies are never negative: don't draw an axis below zero for them.
    return (max(0.0, low - pad) if low >= 0 else low - pad), high + pad


def line_chart(
    title: str,
    y_label: str,
    x_labels: list[str],
    values: dict[str, list[float | None]],
    *,
    y_range: tuple[float, float] | None = None,
    reference: dict[str, float] | None = None,
) -> LineChart:
    """One point per x label for each series (None skips a point); `reference` draws dashed horizontals."""
    chart = LineChart(title=title, y_label=y_label)
    finite = [v for series in values.values() for v in series if v is not None and math.isfinite(v)]
    finite += list((reference or {}).values())
    if not x_labels or not finite:
        return chart
    low, high = y_range or _nice_range(min(finite), max(finite))
    plot_w = chart.right - chart.left
    plot_h = chart.bottom - chart.top

    def x_at(index: int) -> float:
        return chart.left + (plot_w * index / (len(x_labels) - 1) if len(x_labels) > 1 else plot_w / 2)

    def y_at(value: float) -> float:
        return chart.bottom - plot_h * (value - low) / (high - low)

    for index, (name, series) in enumerate(values.items()):
        coords = [
            f"{x_at(i):.1f},{y_at(v):.1f}" for i, v in enumerate(series) if v is not None and math.isfinite(v)
        ]
        chart.series.append(Series(name, COLOURS[index % len(COLOURS)], " ".join(coords), len(coords)))
    for name, value in (reference or {}).items():
        y = f"{y_at(value):.1f}"
        chart.series.append(Series(name, "#6b7280", f"{chart.left},{y} {chart.right},{y}", 2, dashed=True))
    step = max(1, math.ceil(len(x_labels) / 10))
    chart.x_ticks = [Tick(x_at(i), label) for i, label in enumerate(x_labels) if i % step == 0]
    chart.y_ticks = [
        Tick(y_at(low + (high - low) * k / 4), f"{low + (high - low) * k / 4:.3g}") for k in range(5)
    ]
    return chart


def history_charts(
    history: list[dict[str, Any]], *, teacher_accuracy: float | None = None, metric: str = "accuracy"
) -> list[LineChart]:
    """Loss and accuracy per epoch (progressive jobs: `s<stage>e<epoch>`) from a training history."""
    if not history:
        return []
    stages = {entry.get("stage", 1) for entry in history}
    x_labels = [
        f"s{e.get('stage', 1)}e{e.get('epoch')}" if len(stages) > 1 else str(e.get("epoch")) for e in history
    ]

    def column(key: str) -> list[float | None]:
        return [float(e[key]) if isinstance(e.get(key), int | float) else None for e in history]

    losses = {
        key: column(key)
        for key in ("total_loss", "distillation_loss", "student_loss")
        if any(v is not None for v in column(key))
    }
    accuracy = {"student_accuracy": column("student_accuracy")}
    reference = {f"teacher {metric}": teacher_accuracy} if teacher_accuracy is not None else None
    accuracy_range = (0.0, 1.0) if metric == "accuracy" else None
    return [
        line_chart("Loss per epoch", "loss", x_labels, losses),
        line_chart(
            f"Student {metric} per epoch",
            metric,
            x_labels,
            accuracy,
            y_range=accuracy_range,
            reference=reference,
        ),
    ]
