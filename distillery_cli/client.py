"""Commands that talk to a Distillery server over its REST API (httpx): submit, watch, jobs, download..."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

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


def _watch(client: httpx.Client, job_id: str, interval: float) -> dict[str, Any]:
    """Poll the job until it ends, drawing a progress bar; returns the final job."""
    columns = (
        TextColumn("[bold]{task.fields[status]}[/bold]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=100.0, status="pending", eta="-")
        while True:
            job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
            metrics = job.get("metrics") or {}
            parts = [job.get("phase") or ""]
            for key in ("stage", "epoch"):
                if metrics.get(key) is not None:
                    parts.append(f"{key} {metrics[key]}")
            for key in ("total_loss", "distillation_loss", "student_accuracy"):
                if metrics.get(key) is not None:
                    parts.append(f"{key} {_fmt(metrics[key])}")
            eta = job.get("eta_seconds")
            bar.update(
                task,
                completed=float(job.get("progress") or 0.0),
                description="  ".join(p for p in parts if p),
                status=job["status"],
                eta=f"{eta:.0f}s" if isinstance(eta, int | float) else "-",
            )
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)


def _finish(job: dict[str, Any]) -> None:
    status = job["status"]
    if status == "completed" and job.get("results"):
        console.print(results_table(job["results"]))
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
        interval: Annotated[float, typer.Option(help="Seconds between polls with --watch.")] = 1.0,
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
        interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
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
