"""The retention search's trials and the spread over seeds, as rich tables under the results table.

`search_tables(results)` returns nothing for a job without `target_retention` or `seeds`, so the results
table's caller can always print what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _metric_value(value: Any, metric: str) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return f"{100 * number:.2f}%" if metric == "accuracy" else f"{number:.3f}"


def _retention(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{100 * number:.2f}%"


def _ms(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.3f}"


def trials_table(results: Mapping[str, Any]) -> Table | None:
    """One row per trial of the search, the chosen one marked; None without a search."""
    trials = results.get("trials") or []
    search = results.get("search") or {}
    if not trials or not search:
        return None
    metric = str(results.get("metric") or "accuracy")
    target = _number(search.get("target_retention"))
    title = (
        f"Retention search: target {_retention(target)} of the teacher's validation {metric}, "
        f"{search.get('status')}, {len(trials)} trial(s) in {_number(search.get('seconds')) or 0:.1f} s"
    )
    table = Table(title=title, title_justify="left")
    for name in ("trial", "ratio", "parameters", f"val {metric}", "val retention", f"test {metric}"):
        table.add_column(name, justify="right")
    table.add_column("meets", justify="center")
    for name in ("latency b1 (ms)", "latency b64 (ms)", "seconds"):
        table.add_column(name, justify="right")
    chosen = search.get("chosen_trial")
    for trial in trials:
        latency = trial.get("latency_ms") or {}
        mark = "yes" if trial.get("meets_target") else ("error" if trial.get("error") else "no")
        row = [
            str(trial.get("trial")),
            f"{_number(trial.get('compression_ratio')) or 0:.4g}",
            f"{int(trial.get('parameters') or 0):,}",
            _metric_value(trial.get("validation_accuracy"), metric),
            _retention(trial.get("validation_retention")),
            _metric_value(trial.get("test_accuracy"), metric),
            mark,
            _ms(latency.get("batch_1")),
            _ms(latency.get("batch_64")),
            f"{_number(trial.get('seconds')) or 0:.1f}",
        ]
        table.add_row(*row, style="bold" if trial.get("trial") == chosen else None)
    exact = (
        "the job's own epochs"
        if search.get("trials_exact")
        else "fewer epochs than the job (figures as measured, not extrapolated)"
    )
    table.caption = (
        "Decided on validation; test shown, never used to choose. "
        f"Trials trained {search.get('trial_epochs')} epoch(s), {exact}. Bold: the size trained fully."
    )
    return table


def target_line(results: Mapping[str, Any]) -> Text | None:
    """Whether the delivered student meets the retention target, on the test split."""
    target = _number(results.get("target_retention"))
    if target is None:
        return None
    met = results.get("target_met")
    retention = _retention(results.get("accuracy_retention"))
    words = "met" if met else "NOT met (best size found delivered)"
    return Text(
        f"Target retention {_retention(target)}: {words}; delivered student keeps {retention} on test",
        style="bold green" if met else "bold red",
    )


def seeds_table(results: Mapping[str, Any]) -> Table | None:
    """Mean, std, min and max over the seeds of accuracy, retention, baseline and KD gain."""
    summary = results.get("seed_summary") or {}
    if not summary:
        return None
    metric = str(results.get("metric") or "accuracy")
    unit = results.get("kd_gain_unit") or "points"
    seeds = summary.get("seeds") or []
    how = " (best on validation)" if summary.get("delivered_by") == "best_validation" else ""
    table = Table(
        title=f"Over {len(seeds)} seeds {seeds} "
        f"(test split; seed {summary.get('delivered_seed')} delivered{how})",
        title_justify="left",
    )
    table.add_column("figure")
    for name in ("mean", "std", "min", "max"):
        table.add_column(name, justify="right")

    def number(value: Any) -> str:
        return _metric_value(value, metric)

    def gain(value: Any) -> str:
        figure = _number(value)
        return "-" if figure is None else f"{figure:+.2f}"

    def plain_gain(value: Any) -> str:  # a spread is never signed
        figure = _number(value)
        return "-" if figure is None else f"{figure:.2f}"

    rows: list[tuple[str, str, Any, Any]] = [
        (f"KD student {metric}", "student_accuracy", number, number),
        ("retention vs teacher", "accuracy_retention", _retention, _retention),
        (f"labels-only {metric}", "baseline_accuracy", number, number),
        (f"KD gain ({unit}, + = KD better)", "kd_gain", gain, plain_gain),
    ]
    for label, key, fmt, spread_fmt in rows:
        spread = summary.get(key)
        if spread:
            table.add_row(
                label, fmt(spread["mean"]), spread_fmt(spread["std"]), fmt(spread["min"]), fmt(spread["max"])
            )
    return table


def search_tables(results: Mapping[str, Any] | Any) -> list[RenderableType]:
    """What a searched or multi-seed job adds below the results table (empty for other jobs)."""
    if not isinstance(results, Mapping):
        results = results.model_dump(mode="json")
    parts = [target_line(results), trials_table(results), seeds_table(results)]
    return [part for part in parts if part is not None]
