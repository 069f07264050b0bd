"""`distillery run job.json`: train a job in this process with the engine, no server needed.

The engine (torch) is imported only when the command runs, so the REST client commands stay light.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


class _RichCallbacks:
    """Engine callbacks that drive a rich progress bar; Ctrl-C asks the engine to stop at its next check."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=1.0, eta="", metrics="")
        self.stop_requested = False

    def on_progress(self, update: Any) -> None:
        parts = [update.phase]
        if update.stage:
            parts.append(f"stage {update.stage}")
        if update.epoch:
            parts.append(f"epoch {update.epoch}")
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in update.metrics.items())
        eta = f"ETA {update.eta_seconds:.0f}s" if update.eta_seconds is not None else ""
        self.progress.update(
            self.task, completed=update.fraction, description=" ".join(parts), eta=eta, metrics=metrics
        )

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        if kind == "metric":
            self.progress.console.print(
                f"[dim]{message}  loss {data.get('total_loss', float('nan')):.4f}  "
                f"({data.get('seconds', 0.0):.2f}s)[/dim]"
            )
        elif kind in {"phase", "checkpoint"}:
            self.progress.console.print(f"[cyan]{message}[/cyan]")

    def should_stop(self) -> bool:
        return self.stop_requested


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def results_table(results: Any) -> Table:
    """Teacher vs student: parameters, size, metric, latency; plus retention, speedup and KD gain."""
    metric = results.metric
    fmt = _pct if metric == "accuracy" else (lambda v: "-" if v is None else f"{v:.3f}")
    table = Table(title=f"Distillation results ({results.task}, {results.device})")
    table.add_column("figure")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_row("parameters", f"{results.original_parameters:,}", f"{results.compressed_parameters:,}")
    table.add_row(
        "size (MiB)", f"{results.model_size_mb.teacher:.3f}", f"{results.model_size_mb.student:.3f}"
    )
    table.add_row(f"test {metric}", fmt(results.teacher_accuracy), fmt(results.best_student_accuracy))
    for batch in ("batch_1", "batch_64"):
        table.add_row(
            f"latency {batch.replace('_', ' ')} (ms)",
            f"{results.latency_ms.teacher[batch]:.3f}",
            f"{results.latency_ms.student[batch]:.3f}",
        )
    table.add_section()
    table.add_row("compression ratio", "", f"{results.compression_ratio:.4f}")
    table.add_row("accuracy retention", "", f"{results.accuracy_retention:.4f}")
    table.add_row("inference speedup (batch 64)", "", f"{results.inference_speedup:.1f}x")
    table.add_row("cost savings", "", _pct(results.cost_savings))
    table.add_row("initial student", "", fmt(results.initial_student_accuracy))
    if results.baseline_accuracy is not None:
        table.add_row("labels-only baseline", "", fmt(results.baseline_accuracy))
        table.add_row("KD gain (points)", "", f"{results.kd_gain:+.2f}")
    table.add_row("training / total (s)", "", f"{results.training_seconds:.1f} / {results.total_seconds:.1f}")
    return table


def run(
    job_file: Annotated[
        Path, typer.Argument(help="Job spec JSON (the same body POST /distillation/jobs takes).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Artifacts directory (default out/<job name>).")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="Teacher name or local directory (overrides the spec's).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Shared data (built-in teachers); default DATA_DIR.")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint in --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow hub code.")] = False,
) -> None:
    """Train a distillation job locally with a progress bar; write artifacts to --out; print the results."""
    from pydantic import ValidationError

    from app.core.config import get_settings
    from app.schemas.job_spec import JobSpec

    try:
        spec = JobSpec.model_validate(json.loads(job_file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]cannot read {job_file}: {exc}[/red]")
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        console.print(f"[red]invalid job spec {job_file}:[/red]")
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(spec)"
            console.print(f"  {where}: {error['msg']}")
        raise typer.Exit(2) from exc

    from workers.distill.config import EngineConfig
    from workers.distill.contract import EngineError, JobPaths, JobStopped
    from workers.distill.runner import resolve_teacher, run_job

    out_dir = out or Path("out") / job_file.stem
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("[dim]{task.fields[metrics]}"),
    )
    try:
        source = resolve_teacher(teacher or spec.teacher_model_name)
        with Progress(*columns, console=console, transient=False) as progress:
            callbacks = _RichCallbacks(progress)

            def request_stop(signum: int, frame: FrameType | None) -> None:
                callbacks.stop_requested = True

            previous = signal.signal(signal.SIGINT, request_stop)
            try:
                results = run_job(
                    spec,
                    teacher=source,
                    paths=JobPaths(out_dir.resolve()),
                    data_dir=(data_dir or get_settings().data_dir).resolve(),
                    callbacks=callbacks,
                    resume=not fresh,
                    trust_remote_code=trust_remote_code,
                    config=EngineConfig.from_settings(get_settings()),
                )
            finally:
                signal.signal(signal.SIGINT, previous)
    except EngineError as exc:
        console.print(f"[red]job failed ({exc.code}): {exc.message}[/red]")
        raise typer.Exit(1) from exc
    except JobStopped as exc:
        console.print(
            f"[yellow]stopped: {exc}; run again to resume from the last checkpoint in {out_dir}[/yellow]"
        )
        raise typer.Exit(130) from exc
    console.print(results_table(results))
    console.print(f"artifacts: {(out_dir / 'artifacts').resolve()}")


def register(app: typer.Typer) -> None:
    """Add the `run` command to the CLI."""
    app.command("run")(run)
