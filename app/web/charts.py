"""Line charts as inline SVG geometry (computed here, drawn by the templates): no JavaScript, no CDN.

Axes are fitted to the data with round ticks; a loss axis spanning more than a decade is drawn on a log
scale, so epoch 1's large loss does not flatten every later epoch onto zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WIDTH = 560
HEIGHT = 260
MARGIN_LEFT = 64
MARGIN_RIGHT = 16
MARGIN_TOP = 16
MARGIN_BOTTOM = 40
COLOURS = ("#2563eb", "#dc2626", "#059669", "#9333ea")
BASELINE_COLOUR = "#d97706"
REFERENCE_COLOUR = "#6b7280"
# A positive series whose largest value is this many times its smallest is drawn on a log axis.
LOG_SCALE_SPAN = 10.0
TICK_TARGET = 5

LOSS_LABELS = {
    "total_loss": "total loss (weighted sum)",
    "distillation_loss": "distillation loss (vs teacher)",
    "student_loss": "label loss (vs true labels)",
}


@dataclass(frozen=True)
class Series:
    name: str  # a stable key (data-series in the page): total_loss, student_accuracy, baseline_accuracy
    label: str  # what the legend says
    colour: str
    points: str  # "x1,y1 x2,y2 ..." for <polyline points>
    count: int
    dashed: bool = False
    dots: bool = False  # also a dot at each point (a size curve's trials)


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Marker:
    """A highlighted point, e.g. the epoch whose weights were delivered."""

    x: float
    y: float
    label: str


@dataclass
class LineChart:
    """Everything a template needs to draw one chart: plot box, polylines, axis ticks and titles."""

    title: str
    y_label: str  # the y axis title
    x_label: str = "epoch"
    log_scale: bool = False
    width: int = WIDTH
    height: int = HEIGHT
    left: int = MARGIN_LEFT
    top: int = MARGIN_TOP
    right: int = WIDTH - MARGIN_RIGHT
    bottom: int = HEIGHT - MARGIN_BOTTOM
    series: list[Series] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    points: int = 0  # x positions (epochs)
    low: float = 0.0  # y axis bounds
    high: float = 1.0

    def x_at(self, index: int) -> float:
        plot_w = self.right - self.left
        return self.left + (plot_w * index / (self.points - 1) if self.points > 1 else plot_w / 2)

    def y_at(self, value: float) -> float:
        if self.log_scale:
            share = (math.log10(value) - math.log10(self.low)) / (
                math.log10(self.high) - math.log10(self.low)
            )
        else:
            share = (value - self.low) / (self.high - self.low)
        return self.bottom - (self.bottom - self.top) * share


def _nice_step(span: float) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about TICK_TARGET ticks over `span`."""
    raw = span / TICK_TARGET
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)


def nice_linear_axis(
    low: float, high: float, *, floor: float | None = None, ceiling: float | None = None
) -> tuple[float, float, list[float]]:
    """Round bounds enclosing [low, high] and the ticks between them, kept within [floor, ceiling]."""
    if math.isclose(low, high, rel_tol=1e-9, abs_tol=1e-12):
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    pad = (high - low) * 0.04  # no point on the plot's edge
    low, high = low - pad, high + pad
    step = _nice_step(high - low)
    snap = step / 2  # bounds at half steps: a tighter fit, ticks still at whole steps
    start = round(math.floor(low / snap + 1e-9) * snap, 12)
    end = round(math.ceil(high / snap - 1e-9) * snap, 12)
    if floor is not None:
        start = max(start, floor)
    if ceiling is not None:
        end = min(end, ceiling)
    ticks = []
    value = math.ceil(start / step - 1e-9) * step
    while value <= end + step * 1e-6:
        ticks.append(round(value, 12))
        value += step
    return start, end, ticks


def nice_log_axis(low: float, high: float) -> tuple[float, float, list[float]]:
    """Bounds just outside [low, high] (both > 0) and the 1-2-5 ticks between them (1-9 if few)."""
    pad = 10.0 ** (0.04 * math.log10(high / low))  # no point on the plot's edge
    start, end = low / pad, high * pad
    decades = range(math.floor(math.log10(start)), math.ceil(math.log10(end)) + 1)
    ticks: list[float] = []
    for mantissas in ((1.0, 2.0, 5.0), tuple(float(m) for m in range(1, 10))):
        ticks = [m * 10.0**p for p in decades for m in mantissas if start <= m * 10.0**p <= end]
        if len(ticks) >= 3:
            break
    if len(ticks) > 8:  # many decades: decades only
        ticks = [t for t in ticks if math.isclose(t / 10.0 ** math.floor(math.log10(t) + 1e-9), 1.0)]
    return start, end, ticks


def _format_tick(value: float, *, percent: bool) -> str:
    if percent:
        text = f"{value * 100:.1f}".rstrip("0").rstrip(".")
        return f"{text}%"
    return f"{value:.3g}"


def line_chart(
    title: str,
    y_label: str,
    x_labels: list[str],
    values: dict[str, tuple[str, list[float | None]]],
    *,
    reference: dict[str, tuple[str, float]] | None = None,
    percent: bool = False,
    log_scale: bool | None = None,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    colours: dict[str, str] | None = None,
    dashed: frozenset[str] = frozenset(),
    x_label: str = "epoch",
) -> LineChart:
    """One point per x label for each series `{key: (legend label, values)}` (None skips a point).

    `reference` draws dashed horizontals; `log_scale` None decides from the data (LOG_SCALE_SPAN);
    `bounds` limits the fitted axis (accuracies stay within [0, 1]).
    """
    finite = [v for _, series in values.values() for v in series if v is not None and math.isfinite(v)]
    finite += [value for _, value in (reference or {}).values() if math.isfinite(value)]
    if log_scale is None:
        log_scale = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_SCALE_SPAN
    chart = LineChart(title=title, y_label=y_label + (" (log scale)" if log_scale else ""), x_label=x_label)
    chart.log_scale = log_scale
    if not x_labels or not finite:
        return chart
    if log_scale:
        low, high, ticks = nice_log_axis(min(finite), max(finite))
    else:
        low, high, ticks = nice_linear_axis(
            min(finite),
            max(finite),
            floor=bounds[0] if math.isfinite(bounds[0]) else None,
            ceiling=bounds[1] if math.isfinite(bounds[1]) else None,
        )
    chart.points, chart.low, chart.high = len(x_labels), low, high
    x_at, y_at = chart.x_at, chart.y_at
    for index, (key, (label, series)) in enumerate(values.items()):
        coords = [
            f"{x_at(i):.1f},{y_at(v):.1f}" for i, v in enumerate(series) if v is not None and math.isfinite(v)
        ]
        colour = (colours or {}).get(key, COLOURS[index % len(COLOURS)])
        chart.series.append(Series(key, label, colour, " ".join(coords), len(coords), key in dashed))
    for key, (label, value) in (reference or {}).items():
        y = f"{y_at(value):.1f}"
        chart.series.append(
            Series(key, label, REFERENCE_COLOUR, f"{chart.left},{y} {chart.right},{y}", 2, dashed=True)
        )
    step = max(1, math.ceil(len(x_labels) / 10))
    chart.x_ticks = [Tick(x_at(i), label) for i, label in enumerate(x_labels) if i % step == 0]
    chart.y_ticks = [Tick(y_at(t), _format_tick(t, percent=percent)) for t in ticks]
    return chart


def _epoch_key(entry: dict[str, Any]) -> tuple[int, int] | None:
    """(stage, epoch) of a history entry, or None when it has no epoch."""
    epoch = entry.get("epoch")
    return (int(entry.get("stage") or 1), int(epoch)) if isinstance(epoch, int | float) else None


def history_charts(
    history: list[dict[str, Any]],
    *,
    teacher_metric: float | None = None,
    metric: str = "accuracy",
    baseline_history: list[dict[str, Any]] | None = None,
    selected: tuple[int, int] | None = None,
    selected_by: str | None = None,
) -> list[LineChart]:
    """The loss and the validation metric per epoch (progressive jobs: `s<stage>e<epoch>`).

    `baseline_history` (the labels-only run, one stage) is drawn beside the KD run on the metric chart,
    at the epochs of the KD run's last stage; `selected` (stage, epoch) marks the delivered epoch;
    `teacher_metric` is the teacher's test figure, a dashed line. Charts with nothing to draw are left out.
    """
    kd = {key: entry for entry in history if (key := _epoch_key(entry)) is not None}
    last_stage = max((stage for stage, _ in kd), default=1)
    baseline = {
        (last_stage, key[1]): entry
        for entry in baseline_history or []
        if (key := _epoch_key(entry)) is not None
    }
    keys = sorted(set(kd) | set(baseline))
    if not keys:
        return []
    multi_stage = len({stage for stage, _ in keys}) > 1
    x_labels = [f"s{stage}e{epoch}" if multi_stage else str(epoch) for stage, epoch in keys]
    x_label = "stage · epoch" if multi_stage else "epoch"

    def column(source: dict[tuple[int, int], dict[str, Any]], name: str) -> list[float | None]:
        values = [source.get(key, {}).get(name) for key in keys]
        return [float(v) if isinstance(v, int | float) else None for v in values]

    losses = {
        name: (label, column(kd, name))
        for name, label in LOSS_LABELS.items()
        if any(v is not None for v in column(kd, name))
    }
    charts = []
    if losses:
        charts.append(line_chart("Training loss per epoch", "loss", x_labels, losses, x_label=x_label))

    accuracy = metric == "accuracy"
    direction = "higher is better" if accuracy else "lower is better"
    values: dict[str, tuple[str, list[float | None]]] = {}
    for name, source, label in (
        ("student_accuracy", kd, f"KD student, validation {metric}"),
        ("baseline_accuracy", baseline, f"labels-only baseline, validation {metric}"),
    ):
        if any(v is not None for v in column(source, "student_accuracy")):
            values[name] = (label, column(source, "student_accuracy"))
    if not values:
        return charts
    reference = (
        {"teacher_accuracy": (f"teacher, test {metric}", float(teacher_metric))}
        if isinstance(teacher_metric, int | float)
        else None
    )
    metric_chart = line_chart(
        f"Validation {metric} per epoch ({direction})",
        f"validation {metric}",
        x_labels,
        values,
        reference=reference,
        percent=accuracy,
        log_scale=False,
        bounds=(0.0, 1.0) if accuracy else (0.0, math.inf),
        colours={"student_accuracy": COLOURS[0], "baseline_accuracy": BASELINE_COLOUR},
        x_label=x_label,
    )
    delivered = kd.get(selected) if selected is not None else None
    value = delivered.get("student_accuracy") if delivered else None
    if selected is not None and isinstance(value, int | float):
        how = {"best_validation": "best validation", "last": "last epoch"}.get(selected_by or "", "")
        index = keys.index(selected)
        metric_chart.markers.append(
            Marker(
                metric_chart.x_at(index),
                metric_chart.y_at(float(value)),
                f"delivered: epoch {selected[1]}" + (f" ({how})" if how else ""),
            )
        )
    return [*charts, metric_chart]
