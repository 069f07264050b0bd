"""`distillery run job.json`: train a job in this process with the engine, no server needed.

The engine (torch) is imported only when the command runs, so the REST client commands stay light.
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from app.core.paths import PathRefused
from distillery_cli.display import JobProgress, JobView, results_table
from distillery_cli.jobfile import JobFileError, describe_errors, load_job_file

if TYPE_CHECKING:
    from app.schemas.job_spec import JobSpec

console = Console()
# How often the live display is redrawn from progress reports (events redraw it at once).
_REDRAW_SECONDS = 0.25


class _LiveCallbacks:
    """Engine callbacks that drive the same live display as `distillery watch` (JobView): the bar, phase,
    ETA and metrics, with phase lines and one line per training stage above it; Ctrl-C asks the engine to
    stop at its next check."""

    def __init__(self, view: JobView) -> None:
        self.view = view
        self.stop_requested = False
        self._drawn = 0.0

    def on_progress(self, update: Any) -> None:
        metrics = dict(update.metrics)
        for key in ("stage", "epoch", "step", "total_steps"):
            if getattr(update, key) is not None:
                metrics[key] = getattr(update, key)
        snapshot = {
            "status": "running",
            "progress": 100.0 * update.fraction,
            "phase": update.phase,
            "eta_seconds": update.eta_seconds,
            "metrics": metrics,
        }
        self.view.progress.update_from_job(snapshot)
        now = time.monotonic()
        if now - self._drawn >= _REDRAW_SECONDS:  # the engine reports every few steps
            self._drawn = now
            self.view.refresh()

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.view.log_event(
            kind, {"message": message, "data": data, "created_at": datetime.now(UTC).isoformat()}
        )

    def should_stop(self) -> bool:
        return self.stop_requested

    def may_write(self) -> bool:
        return True  # a local run owns its folder: no lease, no other attempt


def _resolve_dataset_path(spec: JobSpec) -> JobSpec:
    """A `file` dataset's path checked and resolved by the shared helper (relative to the working directory:
    the local runner's user owns the machine, so there is no root)."""
    from app.core.paths import PathKind, resolve_path
    from app.schemas.job_spec import FileDataset

    dataset = spec.dataset_config
    if not isinstance(dataset, FileDataset):
        return spec
    # A directory too: image folders and datasets' save_to_disk output (the engine checks what it holds).
    path = resolve_path(dataset.path, root=None, kind=PathKind.any, what="dataset path")
    return spec.model_copy(update={"dataset_config": dataset.model_copy(update={"path": str(path)})})


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
    world_size: Annotated[
        int | None,
        typer.Option(
            "--world-size",
            help="Ranks training the job (training_config.world_size; overrides the spec's): CPU processes "
            "(gloo) or GPUs (nccl).",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="A line per epoch (default: one per training stage).")
    ] = False,
) -> None:
    """Train a distillation job locally with the live display `distillery watch` draws; write artifacts to
    --out; print the results."""
    from pydantic import ValidationError

    from app.core.config import get_settings
    from app.schemas.job_spec import JobSpec

    try:
        body = load_job_file(job_file)
        training = body.setdefault("training_config", {})
        if world_size is not None and isinstance(training, dict):
            training["world_size"] = world_size
        spec = JobSpec.model_validate(body)
    except JobFileError as exc:
        console.print(str(exc), style="red", soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        console.print(f"[red]invalid job spec {job_file}:[/red]")
        for line in describe_errors(exc.errors(), JobSpec):
            console.print(f"  {line}", soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(2) from exc

    try:
        spec = _resolve_dataset_path(spec)
    except PathRefused as exc:
        console.print(f"[red]invalid job spec {job_file}: dataset_config.path: {escape(exc.message)}[/red]")
        raise typer.Exit(2) from exc

    from workers.distill.config import EngineConfig
    from workers.distill.contract import EngineError, JobPaths, JobStopped
    from workers.distill.runner import resolve_teacher, run_job

    out_dir = out or Path("out") / job_file.stem
    try:
        source = resolve_teacher(teacher or spec.teacher_model_name)
        try:
            with Live(JobProgress(), console=console, refresh_per_second=4, transient=False) as live:
                view = JobView(live, verbose=verbose)
                callbacks = _LiveCallbacks(view)

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
                except (EngineError, JobStopped):
                    view.end_stage()
                    raise
                finally:
                    signal.signal(signal.SIGINT, previous)
                view.end_stage()
                view.progress.update_from_job({"status": "completed"})
                view.refresh()
        finally:
            if not console.is_terminal:
                console.line()  # rich ends its last frame without a newline when the output is not a terminal
    except EngineError as exc:
        # One line, however long: scripts read it, and a message may hold brackets.
        console.print(f"[red]job failed ({exc.code}): {escape(exc.message)}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    except JobStopped as exc:
        console.print(
            f"[yellow]stopped: {exc}; run again to resume from the last checkpoint in {out_dir}[/yellow]"
        )
        raise typer.Exit(130) from exc
    console.print(results_table(results))
    # One line however long (a path to copy, and scripts read it), never wrapped at the terminal's width.
    console.print(
        f"artifacts: {(out_dir / 'artifacts').resolve()}", soft_wrap=True, markup=False, highlight=False
    )


def register(app: typer.Typer) -> None:
    """Add the `run` command to the CLI."""
    app.command("run")(run)
