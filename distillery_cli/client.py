"""Commands that talk to a Distillery server over its REST API (httpx): submit, watch, jobs, download..."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from distillery_cli.search_view import search_tables

console = Console()
err_console = Console(stderr=True)

TERMINAL = {"completed", "failed", "cancelled"}
# Exit codes say how a job ended, so scripts can branch on them.
EXIT_OK = 0
EXIT_REQUEST_ERROR = 1
EXIT_JOB_FAILED = 3
EXIT_JOB_CANCELLED = 4
JOB_EXIT_CODES = {"completed": EXIT_OK, "failed": EXIT_JOB_FAILED, "cancelled": EXIT_JOB_CANCELLED}

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="DISTILLERY_URL", help="Base URL of the Distillery API."),
]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="DISTILLERY_API_KEY", help="API key (Bearer token)."),
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _default_key() -> str | None:
    """The key `distillery up` stored under DATA_DIR, when there is one."""
    path = Path(os.environ.get("DATA_DIR", ".distillery")) / "api_key"
    return path.read_text().strip() if path.is_file() else None


def _client(url: str, api_key: str | None) -> httpx.Client:
    key = api_key or _default_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)


def _fail(response: httpx.Response) -> typer.Exit:
    """Print a problem+json answer readably and return the exit to raise."""
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    err_console.print(
        f"[red]{response.status_code} {problem.get('title', '')}[/red]: {problem.get('detail', '')}"
    )
    for error in problem.get("errors", []) or []:
        loc = ".".join(str(part) for part in error.get("loc", []))
        err_console.print(f"  - {loc}: {error.get('msg', error)}")
    return typer.Exit(EXIT_REQUEST_ERROR)


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {client.base_url}[/red]: {exc}")
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc
    if response.is_error:
        raise _fail(response)
    return response


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def results_table(results: dict[str, Any]) -> Table:
    """Teacher vs student side by side: parameters, size, accuracy, latency; then the headline ratios."""
    table = Table(title="Distillation results", show_lines=False)
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    metric = results.get("metric", "accuracy")
    size = results.get("model_size_mb") or {}
    latency = results.get("latency_ms") or {}
    table.add_row(
        "parameters", _fmt(results.get("original_parameters")), _fmt(results.get("compressed_parameters"))
    )
    table.add_row("size (MiB)", _fmt(size.get("teacher")), _fmt(size.get("student")))
    table.add_row(metric, _fmt(results.get("teacher_accuracy")), _fmt(results.get("final_student_accuracy")))
    for batch in ("batch_1", "batch_64"):
        table.add_row(
            f"latency {batch} (ms)",
            _fmt((latency.get("teacher") or {}).get(batch)),
            _fmt((latency.get("student") or {}).get(batch)),
        )
    summary = Table(show_header=False, box=None)
    for key in (
        "compression_ratio",
        "accuracy_retention",
        "memory_savings",
        "inference_speedup",
        "cost_savings",
        "baseline_accuracy",
        "kd_gain",
    ):
        if results.get(key) is not None:
            summary.add_row(key, _fmt(results[key]))
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(summary)
    return outer


@dataclass
class _SseMessage:
    event: str = "message"
    id: int | None = None
    data: str = ""


def _iter_sse(response: httpx.Response) -> Iterator[_SseMessage]:
    """Server-Sent Events of a streaming response, as they arrive (comments/keep-alives skipped)."""
    message, data_lines = _SseMessage(), list[str]()
    for line in response.iter_lines():
        if not line:
            if data_lines:
                message.data = "\n".join(data_lines)
                yield message
            message, data_lines = _SseMessage(), []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            message.event = value
        elif name == "id" and value.isdigit():
            message.id = int(value)
        elif name == "data":
            data_lines.append(value)


class _StreamUnavailable(Exception):
    """The live event stream cannot be used (old server, proxy, repeated drops): poll instead."""


# Reconnects in a row before giving up on the stream (about 30 s); backoff doubles from 0.25 s up to 2 s.
MAX_STREAM_RETRIES = 18
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)  # keep-alives arrive every ~15 s


class _JobView:
    """The progress bar and the log lines above it, fed by stream events or polled job documents."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("", total=100.0, status="pending", eta="-")

    def show(self, job: dict[str, Any]) -> None:
        metrics = job.get("metrics") or {}
        parts = [job.get("phase") or ""]
        for key in ("stage", "epoch"):
            if metrics.get(key) is not None:
                parts.append(f"{key} {metrics[key]}")
        for key in ("total_loss", "distillation_loss", "student_accuracy"):
            if metrics.get(key) is not None:
                parts.append(f"{key} {_fmt(metrics[key])}")
        eta = job.get("eta_seconds")
        self.bar.update(
            self.task,
            completed=float(job.get("progress") or 0.0),
            description="  ".join(p for p in parts if p),
            status=job["status"],
            eta=f"{eta:.0f}s" if isinstance(eta, int | float) else "-",
        )

    def log_event(self, kind: str, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if kind == "state":
            self.bar.console.print(f"[dim]{event.get('created_at', '')[11:19]}[/dim] {event.get('message')}")
        elif kind == "metric" and data.get("epoch") is not None:
            figures = "  ".join(
                f"{key} {_fmt(data[key])}"
                for key in ("total_loss", "distillation_loss", "student_loss", "student_accuracy")
                if isinstance(data.get(key), int | float)
            )
            where = f"stage {data.get('stage', 1)} epoch {data['epoch']}"
            phase = data.get("phase")
            self.bar.console.print(f"  {phase + ' ' if phase else ''}{where}: {figures}")


def _follow_stream(client: httpx.Client, job_id: str, view: _JobView) -> None:
    """Follow the job's event stream until its `end` event, resuming after drops with Last-Event-ID."""
    last_id: int | None = None
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        try:
            with client.stream(
                "GET", f"/distillation/jobs/{job_id}/events", headers=headers, timeout=STREAM_TIMEOUT
            ) as response:
                if response.status_code in (401, 403, 404, 422):
                    response.read()
                    raise _fail(response)
                content_type = response.headers.get("content-type", "")
                if response.is_error or not content_type.startswith("text/event-stream"):
                    raise _StreamUnavailable(f"{response.status_code} {content_type or 'no content type'}")
                for message in _iter_sse(response):
                    failures = 0
                    if message.id is not None:
                        last_id = message.id
                    data = json.loads(message.data) if message.data else {}
                    if message.event == "snapshot":
                        view.show(data)
                    elif message.event == "end":
                        return
                    else:
                        view.log_event(message.event, data)
        except (httpx.TransportError, _StreamUnavailable) as exc:
            failures += 1
            if failures > MAX_STREAM_RETRIES:
                raise _StreamUnavailable(str(exc) or exc.__class__.__name__) from exc
            view.bar.console.print(
                f"[yellow]event stream dropped ({exc.__class__.__name__}); resuming[/yellow]"
            )
            time.sleep(min(2.0, 0.25 * 2 ** (failures - 1)))
            continue
        failures += 1  # closed without `end` (a proxy, a restart): reconnect after the last event
        if failures > MAX_STREAM_RETRIES:
            raise _StreamUnavailable("the stream kept closing before the job ended")


def _poll(client: httpx.Client, job_id: str, interval: float, view: _JobView) -> dict[str, Any]:
    while True:
        job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
        view.show(job)
        if job["status"] in TERMINAL:
            return job
        time.sleep(interval)


def _watch(client: httpx.Client, job_id: str, interval: float) -> dict[str, Any]:
    """Follow the job live over its event stream (polling if that fails), drawing a progress bar;
    returns the final job."""
    columns = (
        TextColumn("[bold]{task.fields[status]}[/bold]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        view = _JobView(bar)
        job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
        view.show(job)
        if job["status"] in TERMINAL:
            return job
        try:
            _follow_stream(client, job_id, view)
        except _StreamUnavailable as exc:
            bar.console.print(
                f"[yellow]live events unavailable ({exc}); polling every {interval:g} s[/yellow]"
            )
            return _poll(client, job_id, interval, view)
        job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
        view.show(job)
        return job


def _finish(job: dict[str, Any]) -> None:
    status = job["status"]
    if status == "completed" and job.get("results"):
        console.print(results_table(job["results"]))
        for part in search_tables(job["results"]):
            console.print(part)
    elif status == "failed":
        error = job.get("error") or {}
        err_console.print(f"[red]job failed[/red] ({error.get('code', '?')}): {error.get('message', '')}")
    console.print(f"job {job['job_id']} {status}")
    raise typer.Exit(JOB_EXIT_CODES.get(status, EXIT_REQUEST_ERROR))


def register(app: typer.Typer) -> None:
    """Add the API client commands to the CLI."""

    @app.command()
    def submit(
        job_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Job spec JSON.")],
        watch: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends.")] = False,
        interval: Annotated[
            float, typer.Option(help="Seconds between polls with --watch, if the event stream fails.")
        ] = 1.0,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
    ) -> None:
        """Create a job from JOB_FILE and start it."""
        spec = json.loads(job_file.read_text())
        with _client(url, api_key) as client:
            job = _request(client, "POST", "/distillation/jobs", json={**spec, "auto_start": True}).json()
            console.print(f"job {job['job_id']} {job['status']}")
            if watch:
                _finish(_watch(client, job["job_id"], interval))

    @app.command("watch")
    def watch_job(
        job_id: str,
        interval: Annotated[
            float, typer.Option(help="Seconds between polls, if the event stream fails.")
        ] = 1.0,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
    ) -> None:
        """Follow a job until it ends; the exit code says how it ended."""
        with _client(url, api_key) as client:
            _finish(_watch(client, job_id, interval))

    @app.command()
    def status(job_id: str, url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
        """Print a job as JSON."""
        with _client(url, api_key) as client:
            console.print_json(data=_request(client, "GET", f"/distillation/jobs/{job_id}").json())

    @app.command()
    def jobs(
        status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
    ) -> None:
        """List recent jobs."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        with _client(url, api_key) as client:
            page = _request(client, "GET", "/distillation/jobs", params=params).json()
        table = Table("job_id", "status", "progress", "teacher", "created_at")
        for job in page["data"]:
            table.add_row(
                job["job_id"],
                job["status"],
                f"{job.get('progress', 0):.0f}%",
                job.get("teacher_model_name", ""),
                str(job.get("created_at", "")),
            )
        console.print(table)

    @app.command()
    def cancel(job_id: str, url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
        """Cancel a job (a running one stops at its next check)."""
        with _client(url, api_key) as client:
            job = _request(client, "POST", f"/distillation/jobs/{job_id}/cancel").json()
        console.print(f"job {job_id} {job.get('status')}")

    @app.command()
    def download(
        job_id: str,
        out: Annotated[Path, typer.Option("--out", help="Directory to write the artifacts to.")] = Path("."),
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
    ) -> None:
        """Download every artifact of a finished job."""
        out.mkdir(parents=True, exist_ok=True)
        with _client(url, api_key) as client:
            listing = _request(client, "GET", f"/distillation/jobs/{job_id}/artifacts").json()
            items = listing["data"] if isinstance(listing, dict) else listing
            for item in items:
                name = Path(item["name"]).name
                with client.stream("GET", f"/distillation/jobs/{job_id}/artifacts/{name}") as response:
                    if response.is_error:
                        response.read()
                        raise _fail(response)
                    with (out / name).open("wb") as handle:
                        for chunk in response.iter_bytes():
                            handle.write(chunk)
                console.print(f"{out / name}  ({item.get('size_bytes', '?')} bytes)")

    @app.command()
    def teachers(url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
        """List the teachers the server knows."""
        with _client(url, api_key) as client:
            listing = _request(client, "GET", "/distillation/teachers").json()
        items = listing["data"] if isinstance(listing, dict) else listing
        table = Table("name", "kind", "type", "params", "task", "location")
        for teacher in items:
            table.add_row(
                teacher["name"],
                str(teacher.get("kind", "")),
                str(teacher.get("type", "")),
                _fmt(teacher.get("params")),
                str(teacher.get("task") or ""),
                str(teacher.get("location", "")),
            )
        console.print(table)

    @app.command()
    def datasets(
        upload: Annotated[
            Path | None, typer.Option("--upload", exists=True, dir_okay=False, help="CSV/JSONL to upload.")
        ] = None,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
    ) -> None:
        """List uploaded datasets, or upload one with --upload."""
        with _client(url, api_key) as client:
            if upload is not None:
                with upload.open("rb") as handle:
                    files = {"file": (upload.name, handle)}
                    created = _request(client, "POST", "/distillation/datasets", files=files).json()
                console.print_json(data=created)
                return
            listing = _request(client, "GET", "/distillation/datasets").json()
        items = listing["data"] if isinstance(listing, dict) else listing
        table = Table("id", "name", "format", "rows", "size_bytes")
        for dataset in items:
            table.add_row(
                dataset["id"],
                dataset["name"],
                dataset["format"],
                str(dataset["num_rows"]),
                str(dataset["size_bytes"]),
            )
        console.print(table)
