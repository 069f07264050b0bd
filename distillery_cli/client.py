"""Commands that talk to a Distillery server over its REST API (httpx): submit, watch, jobs, download..."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from distillery_cli import config
from distillery_cli.config import Connection, Setting
from distillery_cli.display import JobProgress, format_metrics, jobs_table, results_table
from distillery_cli.jobfile import JobFileError, describe_errors, job_request_model, load_job_file

console = Console()
err_console = Console(stderr=True)

TERMINAL = {"completed", "failed", "cancelled"}
# Exit codes say how a job ended, so scripts can branch on them.
EXIT_OK = 0
EXIT_REQUEST_ERROR = 1
EXIT_BAD_JOB_FILE = 2
EXIT_JOB_FAILED = 3
EXIT_JOB_CANCELLED = 4
JOB_EXIT_CODES = {"completed": EXIT_OK, "failed": EXIT_JOB_FAILED, "cancelled": EXIT_JOB_CANCELLED}

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


class ApiClient(httpx.Client):
    """An httpx client for one server that remembers where its URL and key came from (for error messages)."""

    def __init__(self, connection: Connection) -> None:
        key = connection.api_key.value if connection.api_key else None
        super().__init__(
            base_url=connection.url.value,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=30.0,
        )
        self.connection = connection


def _client(url: str | None, api_key: str | None) -> ApiClient:
    try:
        return ApiClient(config.resolve(url, api_key))
    except config.ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc


def _fail(response: httpx.Response, client: ApiClient) -> typer.Exit:
    """Print a problem+json answer readably and return the exit to raise; a 401 says which key was sent."""
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    errors = problem.get("errors") or []
    if errors and isinstance(errors, list):
        # The detail joins the same errors: print them once, one a line, with field suggestions.
        err_console.print(f"[red]{response.status_code} {problem.get('title', '')}[/red]")
        for line in describe_errors(errors, job_request_model()):
            err_console.print(f"  {line}", soft_wrap=True)
    else:
        err_console.print(
            f"[red]{response.status_code} {problem.get('title', '')}[/red]: {problem.get('detail', '')}",
            soft_wrap=True,
        )
    if response.status_code == 401:
        connection = client.connection
        err_console.print(
            f"  {connection.describe_key()} to {connection.url.value} (from {connection.url.source})",
            soft_wrap=True,
        )
        err_console.print("  Set one with `distillery login --url URL --key KEY` or $DISTILLERY_API_KEY.")
    return typer.Exit(EXIT_REQUEST_ERROR)


def _request(client: ApiClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {client.base_url}[/red]: {exc}")
        raise typer.Exit(EXIT_REQUEST_ERROR) from exc
    if response.is_error:
        raise _fail(response, client)
    return response


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


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
    """The live progress display and the log lines above it, fed by stream events or polled job documents.

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

    def print(self, *objects: Any) -> None:
        self.live.console.print(*objects)

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
        key = (phase, int(data.get("stage") or 1))
        if key != self._stage:
            self.end_stage()
            self._stage = key
        self._stage_epochs += 1
        self._stage_last = data
        if self.verbose:
            self.print(f"  {phase} stage {key[1]} epoch {data['epoch']}: {format_metrics(data)}")

    def end_stage(self) -> None:
        """One line for the stage whose epochs were counted (default output; --verbose printed each)."""
        if self._stage is not None and not self.verbose:
            phase, stage = self._stage
            epochs = f"{self._stage_epochs} epoch{'s' if self._stage_epochs != 1 else ''}"
            self.print(f"  {phase} stage {stage} done: {epochs}, last {format_metrics(self._stage_last)}")
        self._stage, self._stage_epochs, self._stage_last = None, 0, {}


def _follow_stream(client: ApiClient, job_id: str, view: _JobView) -> None:
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
                    raise _fail(response, client)
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
            view.print(f"[yellow]event stream dropped ({exc.__class__.__name__}); resuming[/yellow]")
            time.sleep(min(2.0, 0.25 * 2 ** (failures - 1)))
            continue
        failures += 1  # closed without `end` (a proxy, a restart): reconnect after the last event
        if failures > MAX_STREAM_RETRIES:
            raise _StreamUnavailable("the stream kept closing before the job ended")


def _poll(client: ApiClient, job_id: str, interval: float, view: _JobView) -> dict[str, Any]:
    while True:
        job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
        view.show(job)
        if job["status"] in TERMINAL:
            return job
        time.sleep(interval)


def _watch(client: ApiClient, job_id: str, interval: float, *, verbose: bool = False) -> dict[str, Any]:
    """Follow the job live over its event stream (polling if that fails), drawing the progress display;
    returns the final job."""
    try:
        return _watch_live(client, job_id, interval, verbose=verbose)
    finally:
        if not console.is_terminal:
            console.line()  # rich ends its last frame without a newline when the output is not a terminal


def _watch_live(client: ApiClient, job_id: str, interval: float, *, verbose: bool) -> dict[str, Any]:
    with Live(JobProgress(), console=console, refresh_per_second=4, transient=False) as live:
        view = _JobView(live, verbose=verbose)
        job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
        view.show(job)
        if job["status"] in TERMINAL:
            return job
        try:
            _follow_stream(client, job_id, view)
        except _StreamUnavailable as exc:
            view.print(f"[yellow]live events unavailable ({exc}); polling every {interval:g} s[/yellow]")
            job = _poll(client, job_id, interval, view)
        else:
            job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
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
        with _client(url, api_key) as client:
            job = _request(client, "POST", "/distillation/jobs", json={**spec, "auto_start": True}).json()
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
        with _client(url, api_key) as client:
            _finish(_watch(client, job_id, interval, verbose=verbose))

    @app.command()
    def status(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Print a job as JSON."""
        with _client(url, api_key) as client:
            console.print_json(data=_request(client, "GET", f"/distillation/jobs/{job_id}").json())

    @app.command()
    def jobs(
        status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """List recent jobs."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        with _client(url, api_key) as client:
            page = _request(client, "GET", "/distillation/jobs", params=params).json()
        console.print(jobs_table(page["data"], console.width))

    @app.command()
    def cancel(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
        """Cancel a job (a running one stops at its next check)."""
        with _client(url, api_key) as client:
            job = _request(client, "POST", f"/distillation/jobs/{job_id}/cancel").json()
        console.print(f"job {job_id} {job.get('status')}")

    @app.command()
    def download(
        job_id: str,
        out: Annotated[Path, typer.Option("--out", help="Directory to write the artifacts to.")] = Path("."),
        url: UrlOption = None,
        api_key: KeyOption = None,
    ) -> None:
        """Download every artifact of a finished job (nothing is created when it has none)."""
        with _client(url, api_key) as client:
            listing = _request(client, "GET", f"/distillation/jobs/{job_id}/artifacts").json()
            items = listing["data"] if isinstance(listing, dict) else listing
            if not items:
                job = _request(client, "GET", f"/distillation/jobs/{job_id}").json()
                err_console.print(
                    f"job {job_id} has no artifacts (status {job.get('status')}): "
                    "they are written when a job completes; nothing downloaded"
                )
                raise typer.Exit(EXIT_REQUEST_ERROR)
            out.mkdir(parents=True, exist_ok=True)
            for item in items:
                name = Path(item["name"]).name
                target = out / name
                partial = target.with_name(f".{name}.part")
                try:
                    with client.stream("GET", f"/distillation/jobs/{job_id}/artifacts/{name}") as response:
                        if response.is_error:
                            response.read()
                            raise _fail(response, client)
                        with partial.open("wb") as handle:
                            for chunk in response.iter_bytes():
                                handle.write(chunk)
                    partial.replace(target)  # a dropped download never leaves a truncated file behind
                finally:
                    partial.unlink(missing_ok=True)
                console.print(f"{target}  ({item.get('size_bytes', '?')} bytes)", soft_wrap=True)

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
            with ApiClient(connection) as client:
                _request(client, "GET", "/distillation/jobs", params={"limit": 1})
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
        url: UrlOption = None,
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
