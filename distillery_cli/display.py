"""What the CLI draws: the live job progress (fits 80 columns) and the one results table (run, submit).

Torch-free and server-free: both take plain dicts (a job snapshot, a results document) so the same code
renders a job followed over the REST API and one trained in this process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from distillery_cli.search_view import search_tables

# The widest the bar gets; the narrowest before the phase text gives way.
BAR_MAX = 30
BAR_MIN = 10

# Short names for the metrics, in the order shown; each takes the first key present. `loss` and
# `accuracy` are the engine's live (per-step) figures, the others its per-epoch ones.
METRIC_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "total_loss")),
    ("kd", ("distillation_loss",)),
    ("ce", ("student_loss",)),
    ("val", ("student_accuracy", "accuracy")),
    ("val ppl", ("perplexity",)),
    ("lr", ("learning_rate",)),
)
METRIC_KEYS = frozenset(key for _, keys in METRIC_GROUPS for key in keys)


def format_duration(seconds: float | None) -> str:
    """`1:05`, `1:02:03`; `-` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short_number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-3 else f"{value:.4g}"


def format_metrics(metrics: Mapping[str, Any], *, learning_rate: bool = True) -> str:
    """The metrics abbreviated: `loss 0.412  kd 0.23  ce 0.18  val 0.931  lr 0.005`."""
    parts = []
    for label, keys in METRIC_GROUPS:
        if label == "lr" and not learning_rate:
            continue
        value = next((metrics[k] for k in keys if _number(metrics.get(k)) is not None), None)
        if value is not None:
            parts.append(f"{label} {_short_number(float(value))}")
    return "  ".join(parts)


@dataclass
class JobProgress:
    """The live two-line display of one job: bar, percent, phase and ETA first; metrics below.

    Every field comes from the job snapshot or its events; render it with any rich Console (a Live display
    for a terminal, a recording Console in tests). Nothing in it is wider than the console.
    """

    status: str = "pending"
    percent: float = 0.0
    phase: str | None = None
    stage: int | None = None
    epoch: int | None = None
    eta_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Elapsed time: the job's own started_at/finished_at when known, else since the display started.
    started: float = field(default_factory=time.monotonic)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def update_from_job(self, job: Mapping[str, Any]) -> None:
        """Take a job document or stream snapshot (status, progress 0-100, phase, eta_seconds, metrics)."""
        self.status = str(job.get("status") or self.status)
        self._take_progress(job.get("progress"))
        self.phase = job.get("phase") or self.phase
        if "eta_seconds" in job:
            self.eta_seconds = _number(job.get("eta_seconds"))
        metrics = job.get("metrics")
        if isinstance(metrics, Mapping):  # the current phase's: they replace what was shown
            self.metrics = {}
            self._take_metrics(metrics)
        self.started_at = _timestamp(job.get("started_at")) or self.started_at
        self.finished_at = _timestamp(job.get("finished_at")) or self.finished_at
        if self.status == "completed":
            self.percent, self.eta_seconds = 100.0, 0.0

    def elapsed(self) -> float:
        if self.started_at is None:
            return time.monotonic() - self.started
        end = self.finished_at or datetime.now(UTC)
        return max(0.0, (end - self.started_at).total_seconds())

    def update_from_event(self, kind: str, data: Mapping[str, Any]) -> None:
        """Keep the bar in step with the event lines: progress, phase and metric events move it too."""
        if kind == "progress":
            self._take_progress(data.get("progress"))
            if "eta_seconds" in data:
                self.eta_seconds = _number(data.get("eta_seconds"))
        if kind == "phase":  # a new phase: the old one's figures no longer describe what runs
            if data.get("phase") and data.get("phase") != self.phase:
                self.metrics, self.epoch = {}, None
            self.phase = data.get("phase") or self.phase
            if isinstance(data.get("stage"), int):
                self.stage = data["stage"]
        if kind in {"progress", "metric"}:
            self.phase = data.get("phase") or self.phase
            self._take_metrics(data)
        if kind == "state" and isinstance(data.get("to"), str):
            self.status = data["to"]

    def _take_progress(self, value: Any) -> None:
        number = _number(value)
        if number is not None:
            self.percent = max(0.0, min(100.0, number))

    def _take_metrics(self, metrics: Mapping[str, Any]) -> None:
        for key in ("stage", "epoch"):
            if isinstance(metrics.get(key), int):
                setattr(self, key, metrics[key])
        self.metrics.update({k: v for k, v in metrics.items() if k in METRIC_KEYS})

    def where(self) -> str:
        """`distill s1 e3`, or the status while the job is not running."""
        if self.status not in {"running", "pausing", "cancelling"} or not self.phase:
            return self.status
        parts = [self.phase]
        if self.stage is not None:
            parts.append(f"s{self.stage}")
        if self.epoch is not None:
            parts.append(f"e{self.epoch}")
        text = " ".join(parts)
        return text if self.status == "running" else f"{self.status} {text}"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        percent = f"{self.percent:3.0f}%"
        eta = f"ETA {format_duration(self.eta_seconds)}"
        elapsed = format_duration(self.elapsed())
        where = self.where()
        # Fixed parts first: percent, ETA, elapsed, four separating spaces; the bar takes what is left,
        # up to BAR_MAX; the phase text is cut (with an ellipsis) before the bar goes under BAR_MIN.
        fixed = len(percent) + len(eta) + len(elapsed) + 4
        bar_width = max(BAR_MIN, min(BAR_MAX, width - fixed - len(where)))
        room_for_where = max(0, width - fixed - bar_width)
        if len(where) > room_for_where:
            where = where[: max(0, room_for_where - 1)] + "…" if room_for_where > 1 else ""
        filled = round(bar_width * self.percent / 100.0)
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append("█" * filled, style="green")
        line.append("░" * (bar_width - filled), style="dim")
        line.append(f" {percent} ")
        line.append(where, style="bold")
        line.append(f" {eta} ")
        line.append(elapsed, style="dim")
        line.truncate(width, overflow="ellipsis")
        yield line
        metrics = format_metrics(self.metrics)
        if metrics:
            below = Text(metrics, style="dim", no_wrap=True, overflow="ellipsis")
            below.truncate(width, overflow="ellipsis")
            yield below


def _timestamp(value: Any) -> datetime | None:
    """An ISO 8601 time from the API (aware; a naive one is taken as UTC)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def jobs_table(jobs: list[dict[str, Any]], width: int) -> Table:
    """Jobs one per line with their ids whole (to copy) at any `width` >= 80: the teacher's name gives way."""
    columns = {"job id": 36, "status": 10, "done": 4, "created (UTC)": 16}
    # Two spaces between columns, none at the edges, no box.
    teacher_width = max(6, width - sum(columns.values()) - 2 * len(columns))
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, header_style="bold")
    for name, size in columns.items():
        table.add_column(name, no_wrap=True, min_width=size, justify="right" if name == "done" else "left")
    table.add_column("teacher", no_wrap=True)
    for job in jobs:
        created = str(job.get("created_at") or "")
        progress = _number(job.get("progress"))
        table.add_row(
            str(job["job_id"]),
            str(job.get("status", "")),
            "-" if progress is None else f"{progress:.0f}%",
            created[:16].replace("T", " "),
            _cut(str(job.get("teacher_model_name") or ""), teacher_width),
        )
    return table


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- the results table -------------------------------------------------------------------------------------

_METRIC_WORDS = {"accuracy": "accuracy", "perplexity": "perplexity"}


@dataclass(frozen=True)
class _Metric:
    """How to print the job's task metric: its name, direction and unit."""

    name: str
    higher_is_better: bool

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def value(self, value: Any) -> str:
        number = _number(value)
        if number is None:
            return "-"
        return f"{100 * number:.2f}%" if self.name == "accuracy" else f"{number:.3f}"


def _metric_of(results: Mapping[str, Any]) -> _Metric:
    name = str(results.get("metric") or "accuracy")
    direction = results.get("metric_direction")
    if direction in {"higher_is_better", "lower_is_better"}:
        higher = direction == "higher_is_better"
    else:  # results written before the direction was recorded: perplexity is the one lower-is-better metric
        higher = name != "perplexity"
    return _Metric(_METRIC_WORDS.get(name, name.replace("_", " ")), higher)


def delivered_figure(results: Mapping[str, Any]) -> tuple[float | None, str]:
    """The delivered student's test metric and how its epoch was chosen.

    `student_accuracy` + `selected_by` when the results carry them; older results delivered the
    best-validation epoch, whose test figure is `best_student_accuracy`.
    """
    if _number(results.get("student_accuracy")) is not None:
        return _number(results["student_accuracy"]), str(results.get("selected_by") or "best_validation")
    return _number(results.get("best_student_accuracy")), "best_validation"


def kd_comparison(results: Mapping[str, Any]) -> str | None:
    """`+2.78 points of test accuracy, KD better (...)`, `-0.090 perplexity, KD worse (...)`.

    Signed so that positive means KD beat the labels-only baseline. Results with `kd_gain_unit` carry that
    sign already; older ones are recomputed from the two figures, since their `kd_gain` was
    `100 * (student - baseline)` even for perplexity, where that sign is backwards.
    """
    metric = _metric_of(results)
    baseline = _number(results.get("baseline_accuracy"))
    student, _ = delivered_figure(results)
    unit = results.get("kd_gain_unit")
    gain = _number(results.get("kd_gain"))
    if unit not in {"points", "perplexity"} or gain is None:
        if baseline is None or student is None:
            return None
        if metric.name == "accuracy":
            gain, unit = 100.0 * (student - baseline), "points"
        else:
            gain = (student - baseline) if metric.higher_is_better else (baseline - student)
            unit = metric.name
    verdict = "KD better" if gain > 0 else "KD worse" if gain < 0 else "no difference"
    amount = f"{gain:+.2f} points of test {metric.name}" if unit == "points" else f"{gain:+.3f} {unit}"
    return f"{amount}, {verdict} ({metric.name}: {metric.direction})"


def _selected_words(selected_by: str) -> str:
    return {
        "best_validation": "the best validation epoch",
        "last": "the last epoch",
    }.get(selected_by, selected_by.replace("_", " "))


def _mib(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.3f} MiB"


def _ms(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.3f} ms"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _percent(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{100 * number:.1f}%"


def results_table(results: Mapping[str, Any] | Any) -> RenderableType:
    """The results of a finished job in words with units: teacher vs student, then the comparisons.

    Headlines `student_accuracy` (the delivered student on the test split) with how its epoch was chosen;
    every comparison names the metric and its direction. Takes a results dict or a DistillationResults.
    """
    if not isinstance(results, Mapping):
        results = results.model_dump(mode="json")
    metric = _metric_of(results)
    student, selected_by = delivered_figure(results)
    epoch = results.get("selected_epoch")
    split = str(results.get("metric_split") or "test")
    size = results.get("model_size_mb") or {}
    latency = results.get("latency_ms") or {}

    title = "Distillation results"
    where = ", ".join(str(results[k]) for k in ("task", "device") if results.get(k))
    if where:
        title += f" ({where})"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_row(
        f"{split.capitalize()} {metric.name}",
        metric.value(results.get("teacher_accuracy")),
        Text(metric.value(student), style="bold"),
    )
    table.add_row(
        "Parameters", _count(results.get("original_parameters")), _count(results.get("compressed_parameters"))
    )
    table.add_row("Size", _mib(size.get("teacher")), _mib(size.get("student")))
    for batch, words in (("batch_1", "batch of 1"), ("batch_64", "batch of 64")):
        table.add_row(
            f"Latency, {words}",
            _ms((latency.get("teacher") or {}).get(batch)),
            _ms((latency.get("student") or {}).get(batch)),
        )

    lines = Table.grid(padding=(0, 1))
    lines.add_column(style="bold", no_wrap=True)
    lines.add_column()
    chosen = _selected_words(selected_by)
    if isinstance(epoch, int):
        chosen += f" ({epoch})"
    lines.add_row("Student", f"{metric.value(student)} {split} {metric.name} ({metric.direction})")
    lines.add_row("Delivered", f"weights of {chosen}")
    retention = _number(results.get("accuracy_retention"))
    if retention is not None:
        lines.add_row("Retention", f"{100 * retention:.2f}% of the teacher's {split} {metric.name}")
    comparison = kd_comparison(results)
    if comparison is not None:
        baseline = metric.value(results.get("baseline_accuracy"))
        lines.add_row("KD vs labels-only", f"{comparison}; labels-only {baseline}")
    if _number(results.get("compression_ratio")) is not None:
        memory = _percent(results.get("memory_savings"))
        lines.add_row(
            "Compression",
            f"student has {_percent(results.get('compression_ratio'))} of the teacher's parameters; "
            f"{memory} less memory",
        )
    speedup = _number(results.get("inference_speedup"))
    if speedup is not None:
        lines.add_row(
            "Speed",
            f"{speedup:.1f}x faster than the teacher at batch 64; "
            f"estimated cost savings {_percent(results.get('cost_savings'))}",
        )
    initial = _number(results.get("initial_student_accuracy"))
    if initial is not None:
        lines.add_row("Before training", f"student {split} {metric.name} {metric.value(initial)}")
    training, total = _number(results.get("training_seconds")), _number(results.get("total_seconds"))
    if training is not None and total:
        lines.add_row("Time", f"{training:.1f} s training of {total:.1f} s in all")
    return Group(table, lines, *search_tables(results))  # target verdict, trials, seed spread


class JobView:
    """The live progress display and the log lines above it, fed by stream events or polled job documents
    (`distillery watch`), or by the engine's callbacks in this process (`distillery run`).

    By default the lines are state changes, phase starts and one summary per training stage; `verbose`
    adds a line per epoch. Every event also moves the display, so the bar never lags the lines.
    """

    def __init__(self, live: Live, *, verbose: bool = False) -> None:
        self.live = live
        self.verbose = verbose
        self.progress = JobProgress()
        self._stage: tuple[str, int] | None = None  # (phase, stage) of the epochs being counted
        self._stage_epochs = 0
        self._stage_last: dict[str, Any] = {}

    def print(self, text: str, *, cut: bool = False) -> None:
        """A line above the display; `cut` ones (figures) end in an ellipsis rather than wrap."""
        if cut:
            self.live.console.print(text, no_wrap=True, overflow="ellipsis")
        else:
            self.live.console.print(text)

    def refresh(self) -> None:
        self.live.update(self.progress, refresh=True)

    def show(self, job: dict[str, Any]) -> None:
        self.progress.update_from_job(job)
        self.refresh()

    def log_event(self, kind: str, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        self.progress.update_from_event(kind, data)
        message = str(event.get("message") or "")
        if kind == "state":
            self.end_stage()
            self.print(f"[dim]{str(event.get('created_at', ''))[11:19]}[/dim] {message}")
        elif kind == "phase":
            self.end_stage()
            self.print(f"  {message}")
        elif kind == "metric" and data.get("epoch") is not None:
            self._count_epoch(data)
        elif kind == "warning":
            self.print(f"  [yellow]warning: {message}[/yellow]")
        elif kind == "checkpoint" and self.verbose:
            self.print(f"  [dim]{message}[/dim]")
        self.refresh()

    def _count_epoch(self, data: dict[str, Any]) -> None:
        phase = str(data.get("phase") or "distill")
        stage = data.get("stage")
        key = (phase, 1 if stage is None else int(stage))  # the baseline run is stage 0: not "or 1"
        if key != self._stage:
            self.end_stage()
            self._stage = key
        self._stage_epochs += 1
        self._stage_last = data
        if self.verbose:
            self.print(f"  {phase} stage {key[1]} epoch {data['epoch']}: {format_metrics(data)}", cut=True)

    def end_stage(self) -> None:
        """One line for the stage whose epochs were counted (default output; --verbose printed each)."""
        if self._stage is not None and not self.verbose:
            phase, stage = self._stage
            epochs = f"{self._stage_epochs} epoch{'s' if self._stage_epochs != 1 else ''}"
            last = format_metrics(self._stage_last, learning_rate=False)
            self.print(f"  {phase} stage {stage}: {epochs}, last {last}", cut=True)
        self._stage, self._stage_epochs, self._stage_last = None, 0, {}
