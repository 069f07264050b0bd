"""Commands that talk to a Distillery server through the SDK (`distillery.Client`): submit, watch, jobs...

The SDK does the HTTP (retries of 429/5xx honouring Retry-After, Idempotency-Keys, the event stream);
this module turns its answers and errors into terminal output and exit codes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

import distillery
from distillery_cli import config
from distillery_cli.config import Connection, Setting
from distillery_cli.display import JobProgress, JobView, jobs_table, results_table
from distillery_cli.jobfile import JobFileError, describe_errors, job_request_model, load_job_file

console = Console()
err_console = Console(stderr=True)

# Where watching ends: a final state, or paused (resumed only by `distillery resume`).
TERMINAL = {"completed", "failed", "cancelled", "paused"}
# Exit codes say how a job ended, so scripts can branch on them.
EXIT_OK = 0
EXIT_REQUEST_ERROR = 1
EXIT_BAD_JOB_FILE = 2
EXIT_JOB_FAILED = 3
EXIT_JOB_CANCELLED = 4
EXIT_JOB_PAUSED = 5
JOB_EXIT_CODES = {
    "completed": EXIT_OK,
    "failed": EXIT_JOB_FAILED,
    "cancelled": EXIT_JOB_CANCELLED,
    "paused": EXIT_JOB_PAUSED,
}

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Base URL of the API [default: $DISTILLERY_URL, config file, ./.distillery/url].",
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key [default: $DISTILLERY_API_KEY, config file, ./.distillery/api_key].",
    ),
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="With --watch: a line per epoch, not only per stage.")
]


def _say_retry(retry: distillery.Retry) -> None:
    why = f"{retry.status} {retry.reason}" if retry.status else f"connection failed ({retry.reason})"
    err_console.print(
        f"[yellow]{why}: retrying {retry.method} {retry.path} in {retry.delay:.1f} s[/yellow]", soft_wrap=True
    )


def print_problem(exc: distillery.ApiError, connection: Connection) -> None:
    """An error answer in a few lines: each field error once (with suggestions); a 401 says which key
    was sent and where it came from."""
    if exc.errors:
        # The detail joins the same errors: print them once, one a line.
        err_console.print(f"[red]{exc.status} {exc.title}[/red]")
        for line in describe_errors(exc.errors, job_request_model()):
            err_console.print(f"  {line}", soft_wrap=True, markup=False, highlight=False)
    else:
        err_console.print(f"[red]{exc.status} {exc.title}[/red]: {exc.detail}", soft_wrap=True)
    if exc.status == 401:
        err_console.print(
            f"  {connection.describe_key()} to {connection.url.value} (from {connection.url.source})",
            soft_wrap=True,
        )
        err_console.print("  Set one with `distillery login --url URL --key KEY` or $DISTILLERY_API_KEY.")


@contextmanager
def _connect(
    url: str | None, api_key: str | None, connection: Connection | None = None
) -> Iterator[distillery.Client]:
    """A Client for the command; its errors become a message and exit code 1."""
    try:
        if connection is not None:
            url, api_key = connection.url.value, connection.api_key.value if connection.api_key else None
        client = distillery.Client(url, api_key, on_retry=_say_retry)
    except config.ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc
    if connection is not None:
        client.connection = connection
    try:
        with client:
            yield client
    except distillery.ApiError as exc:
        print_problem(exc, client.connection)
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc
    except distillery.TransportError as exc:
        err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc
    except distillery.NoArtifactsError as exc:
        err_console.print(f"{exc}; nothing downloaded", soft_wrap=True)
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _follow_stream(client: distillery.Client, job_id: str, view: JobView) -> None:
    """Follow the job's events until it ends (the SDK resumes after drops with Last-Event-ID)."""

    def dropped(exc: Exception) -> None:
        view.print(f"[yellow]event stream dropped ({exc.__class__.__name__}); resuming[/yellow]")

    for event in client.events(job_id, on_drop=dropped):
        if event.kind == "snapshot":
            view.show(dict(event.data))
        else:
            view.log_event(event.kind, event.raw)


def _poll(client: distillery.Client, job_id: str, interval: float, view: JobView) -> dict[str, Any]:
    while True:
        job = dict(client.get(job_id))
        view.show(job)
        if job["status"] in TERMINAL:
            return job
        time.sleep(interval)


def _watch(
    client: distillery.Client, job_id: str, interval: float, *, verbose: bool = False
) -> dict[str, Any]:
    """Follow the job live over its event stream (polling if that fails), drawing the progress display;
    returns the final job."""
    try:
        return _watch_live(client, job_id, interval, verbose=verbose)
    finally:
        if not console.is_terminal:
            console.line()  # rich ends its last frame without a newline when the output is not a terminal


def _watch_live(client: distillery.Client, job_id: str, interval: float, *, verbose: bool) -> dict[str, Any]:
    with Live(JobProgress(), console=console, refresh_per_second=4, transient=False) as live:
        view = JobView(live, verbose=verbose)
        job = dict(client.get(job_id))
        view.show(job)
        if job["status"] in TERMINAL:
            return job
        try:
            _follow_stream(client, job_id, view)
        except distillery.StreamUnavailableError as exc:
            view.print(f"[yellow]live events unavailable ({exc}); polling every {interval:g} s[/yellow]")
            job = _poll(client, job_id, interval, view)
        else:
            job = dict(client.get(job_id))
            view.show(job)
        view.end_stage()
        return job


def _finish(job: dict[str, Any]) -> None:
    status = job["status"]
    if status == "completed" and job.get("results"):
        console.print(results_table(job["results"]))
    elif status == "failed":
        error = job.get("error") or {}
        err_console.print(f"[red]job failed[/red] ({error.get('code', '?')}): {error.get('message', '')}")
    elif status == "paused":
        console.print(f"paused; continue it with: distillery resume {job['job_id']}")
    console.print(f"job {job['job_id']} {status}")
    raise typer.Exit(JOB_EXIT_CODES.get(status, EXIT_REQUEST_ERROR))


def register(app: typer.Typer) -> None:
    """Add the API client commands to the CLI."""

    @app.command()
    def submit(
        job_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Job spec JSON.")],
        watch: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends.")] = False,
        verbose: VerboseOption = False,
        interval: Annotated[
            float, typer.Option(help="Seconds between polls with --watch, if the event stream fails.")
        ] = 1.0,
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """Create a job from JOB_FILE and start it."""
        try:
            spec = load_job_file(job_file)
        except JobFileError as exc:
            err_console.print(str(exc), soft_wrap=True, markup=False, highlight=False)
            raise typer.Exit(EXIT_BAD_JOB_FILE) from exc
        with _connect(url, api_key) as client:
            job = client.create(spec, auto_start=True)
            console.print(f"job {job['job_id']} {job['status']}")
            if watch:
                _finish(_watch(client, job["job_id"], interval, verbose=verbose))

    @app.command("watch")
    def watch_job(
        job_id: str,
        verbose: VerboseOption = False,
        interval: Annotated[
            float, typer.Option(help="Seconds between polls, if the event stream fails.")
        ] = 1.0,
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """Follow a job until it ends; the exit code says how it ended."""
        with _connect(url, api_key) as client:
            _finish(_watch(client, job_id, interval, verbose=verbose))

    @app.command()
    def status(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Print a job as JSON."""
        with _connect(url, api_key) as client:
            console.print_json(data=dict(client.get(job_id)))

    @app.command()
    def jobs(
        status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """List recent jobs."""
        with _connect(url, api_key) as client:
            page = client.list(status=status, limit=limit)
        console.print(jobs_table([dict(job) for job in page.data], console.width))

    @app.command()
    def cancel(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Cancel a job (a running one stops at its next check)."""
        with _connect(url, api_key) as client:
            job = client.cancel(job_id)
        console.print(f"job {job['job_id']} {job.get('status')}")

    @app.command()
    def pause(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Pause a job: a queued one at once, a running one at its next check (its checkpoint kept)."""
        with _connect(url, api_key) as client:
            job = client.pause(job_id)
        console.print(f"job {job['job_id']} {job.get('status')}")

    @app.command()
    def resume(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Resume a paused job from its checkpoint (it queues again)."""
        with _connect(url, api_key) as client:
            job = client.resume(job_id)
        console.print(f"job {job['job_id']} {job.get('status')}")

    @app.command()
    def download(
        job_id: str,
        out: Annotated[Path, typer.Option("--out", help="Directory to write the artifacts to.")] = Path("."),
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """Download every artifact of a finished job (nothing is created when it has none)."""

        def written(path: Path, item: distillery.Artifact) -> None:
            console.print(f"{path}  ({item.get('size_bytes', '?')} bytes)", soft_wrap=True)

        with _connect(url, api_key) as client:
            client.download(job_id, out, on_file=written)

    @app.command()
    def login(
        url: Annotated[str, typer.Option("--url", help="Base URL of the Distillery API.")],
        key: Annotated[
            str | None, typer.Option("--key", help="API key (asked for, hidden, when not given).")
        ] = None,
        check: Annotated[bool, typer.Option(help="Try the key against the server before saving.")] = True,
    ) -> None:
        """Save URL and key to the user's config file, so the CLI finds them from any folder."""
        key = key or typer.prompt("API key", hide_input=True)
        connection = Connection(url=Setting(url.rstrip("/"), "--url"), api_key=Setting(key, "--key"))
        if check:
            with _connect(None, None, connection) as client:
                client.list(limit=1)
        path = config.write_config(url=connection.url.value, api_key=key)
        console.print(
            f"saved {connection.url.value} and key {config.key_prefix(key)} to {path}", soft_wrap=True
        )

    @app.command("config")
    def show_config(url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Print the URL and key (prefix) the CLI would use, and where each came from."""
        try:
            connection = config.resolve(url, api_key)
        except config.ConfigError as exc:
            err_console.print(f"[red]{exc}[/red]")
            raise typer.Exit(EXIT_REQUEST_ERROR) from exc
        console.print(f"config file: {config.config_path()}", soft_wrap=True)
        console.print(f"url:         {connection.url.value}  (from {connection.url.source})", soft_wrap=True)
        if connection.api_key is None:
            console.print("api key:     none found")
        else:
            key = connection.api_key
            console.print(f"api key:     {config.key_prefix(key.value)}  (from {key.source})", soft_wrap=True)

    @app.command()
    def teachers(url: UrlOption = None, api_key: KeyOption = None) -> None:
        """List the teachers the server knows."""
        with _connect(url, api_key) as client:
            listing = client.request("GET", "/distillation/teachers").json()
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
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """List uploaded datasets, or upload one with --upload."""
        with _connect(url, api_key) as client:
            if upload is not None:
                # Bytes, not the open file: a retried POST sends the whole file again.
                files = {"file": (upload.name, upload.read_bytes())}
                created = client.request("POST", "/distillation/datasets", files=files).json()
                console.print_json(data=created)
                return
            listing = client.request("GET", "/distillation/datasets").json()
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
