"""`distillery.Client`: the REST API of a Distillery server as typed Python calls.

    from distillery import Client

    with Client() as client:                     # URL and key: see distillery.config (env, login, up)
        job = client.create("examples/digits.json", auto_start=True)
        for event in client.events(job["job_id"]):
            print(event.kind, event.message)
        job = client.wait(job["job_id"])
        client.download(job["job_id"], "student/")

Every call retries what is safe to retry: 429 and 5xx answers and dropped connections, with exponential
backoff (0.5 s doubling, capped) that honours the server's Retry-After. Every POST carries an
Idempotency-Key (a fresh one per call, the same across that call's retries), so a retried create never
makes two jobs.
"""

from __future__ import annotations

import builtins
import email.utils
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import httpx

from distillery import config
from distillery.errors import (
    ApiError,
    NoArtifactsError,
    StreamUnavailableError,
    TransportError,
    error_for,
)

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# Where `wait` returns: a final state, or paused (nothing moves until `resume`).
SETTLED_STATUSES = TERMINAL_STATUSES | {"paused"}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
IDEMPOTENCY_HEADER = "Idempotency-Key"


class Job(TypedDict, total=False):
    """A job as the API returns it (`GET /distillation/jobs/{id}`); list pages hold a subset."""

    job_id: str
    status: str  # pending queued dispatched running pausing paused cancelling completed failed cancelled
    progress: float  # 0-100 over the whole job, never decreasing
    phase: str | None
    eta_seconds: float | None
    estimated_completion: str | None
    metrics: dict[str, Any] | None
    results: dict[str, Any] | None  # DistillationResults once completed (student_accuracy, ...)
    error: dict[str, Any] | None  # {code, message} of a failed job
    attempt: int
    teacher_model_name: str
    spec: dict[str, Any]
    created_at: str
    updated_at: str
    queued_at: str | None
    dispatched_at: str | None
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None


class Artifact(TypedDict, total=False):
    """One file a finished job wrote."""

    name: str
    size_bytes: int
    sha256: str
    content_type: str


@dataclass(frozen=True)
class Page:
    """One page of a list: `data`, and `next_cursor` to pass back while `has_more`."""

    data: list[Job]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True)
class Event:
    """One message of a job's event stream.

    `kind` is the event kind (`state`, `phase`, `progress`, `metric`, `checkpoint`, `warning`) or
    `snapshot` (the job's latest status, progress, phase, ETA and metrics; `id` None). `data` holds the
    event's data (the snapshot itself for a snapshot); `raw` the whole message as sent.
    """

    kind: str
    id: int | None
    message: str
    data: dict[str, Any]
    created_at: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Retry:
    """What `on_retry` is told before the SDK waits and tries again."""

    method: str
    path: str
    attempt: int  # 1 for the first retry
    delay: float  # seconds it will wait
    status: int | None  # the answer's status, or None after a dropped connection
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429, 5xx and dropped connections: `max_retries` more tries, waits doubling from
    `backoff` seconds up to `max_backoff`, a server's Retry-After used instead (capped at
    `max_retry_after`), with ±20% jitter so clients do not come back in step."""

    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.max_retry_after, max(0.0, retry_after))
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"title": response.reason_phrase, "detail": response.text[:500]}
    return body if isinstance(body, dict) else {"title": response.reason_phrase, "detail": str(body)[:500]}


# Reconnects in a row before events() gives up (about 30 s); backoff doubles from 0.25 s up to 2 s.
MAX_STREAM_RETRIES = 18
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)  # keep-alives arrive every ~15 s


class Client:
    """A Distillery server. Use as a context manager, or call `close()`.

    `base_url` and `api_key` default to the first of `DISTILLERY_URL` / `DISTILLERY_API_KEY`, the config
    file `distillery login` and `distillery up` write, and `./.distillery` (see `distillery.config`).
    `on_retry` is called before each retry (to log it). `idempotency=False` sends no Idempotency-Key.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[Retry], None] | None = None,
        idempotency: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.connection = config.resolve(base_url, api_key)
        key = self.connection.api_key.value if self.connection.api_key else None
        self.base_url = self.connection.url.value
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.idempotency = idempotency
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=timeout,
            transport=transport,
        )

    # -- plumbing ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post_headers(self, idempotency_key: str | None) -> dict[str, str]:
        if idempotency_key is None and not self.idempotency:
            return {}
        return {IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())}

    def _send_with_retries(
        self, method: str, path: str, send: Callable[[], httpx.Response]
    ) -> httpx.Response:
        """`send()` until it answers something other than 429/5xx, or the retries are spent."""
        attempt = 0
        while True:
            try:
                response = send()
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries:
                    raise TransportError(f"cannot reach {self.base_url}: {exc}") from exc
                attempt += 1
                self._wait(Retry(method, path, attempt, self.retry.delay(attempt, None), None, str(exc)))
                continue
            if response.status_code not in RETRY_STATUSES or attempt >= self.retry.max_retries:
                return response
            response.read()
            response.close()
            attempt += 1
            delay = self.retry.delay(attempt, _retry_after(response))
            self._wait(Retry(method, path, attempt, delay, response.status_code, response.reason_phrase))

    def _wait(self, retry: Retry) -> None:
        if self.on_retry is not None:
            self.on_retry(retry)
        time.sleep(retry.delay)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call with retries; raises an ApiError subclass for an error answer.

        A POST without an Idempotency-Key header gets one (unless `idempotency=False`), the same for
        all of its retries.
        """
        if method.upper() == "POST":
            headers = dict(kwargs.pop("headers", None) or {})
            if not any(name.lower() == IDEMPOTENCY_HEADER.lower() for name in headers):
                headers.update(self._post_headers(None))
            kwargs["headers"] = headers
        response = self._send_with_retries(method, path, lambda: self._http.request(method, path, **kwargs))
        if response.is_error:
            raise error_for(response.status_code, _problem(response), method=method, path=path)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- jobs --------------------------------------------------------------------------------------------
    def create(
        self,
        spec: Mapping[str, Any] | str | os.PathLike[str],
        *,
        auto_start: bool = False,
        idempotency_key: str | None = None,
    ) -> Job:
        """Create a job from a spec (a dict, or the path of a JSON job file); queued at once with
        `auto_start`, else pending until `start`. 422 (InvalidRequestError) names each bad field."""
        if isinstance(spec, str | os.PathLike):
            body: dict[str, Any] = json.loads(Path(spec).read_text(encoding="utf-8"))
        else:
            body = dict(spec)
        if auto_start:
            body["auto_start"] = True
        headers = self._post_headers(idempotency_key)
        return cast(Job, self._json("POST", "/distillation/jobs", json=body, headers=headers))

    def start(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        """pending -> queued. 409 from another state; 429 (retried) while the queue is full."""
        return self._post(f"/distillation/jobs/{job_id}/start", idempotency_key)

    def get(self, job_id: str) -> Job:
        """The job now: status, progress, phase, ETA, metrics, results once completed, error once failed."""
        return cast(Job, self._json("GET", f"/distillation/jobs/{job_id}"))

    def list(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> Page:
        """One page of this tenant's jobs, newest first; pass `next_cursor` back as `cursor` for more."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        body = self._json("GET", "/distillation/jobs", params=params)
        return Page(data=body["data"], has_more=bool(body["has_more"]), next_cursor=body.get("next_cursor"))

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[Job]:
        """Every job (of `status`), page after page."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, limit=page_size, cursor=cursor)
            yield from page.data
            if not page.has_more or not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        """Cancel: a queued or paused job at once, a running one at the engine's next check."""
        return self._post(f"/distillation/jobs/{job_id}/cancel", idempotency_key)

    def pause(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        """Pause: running -> pausing -> paused at the engine's next check (checkpoint kept, slot freed);
        queued -> paused at once."""
        return self._post(f"/distillation/jobs/{job_id}/pause", idempotency_key)

    def resume(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        """paused -> queued; the run continues from its checkpoint without repeating a finished epoch."""
        return self._post(f"/distillation/jobs/{job_id}/resume", idempotency_key)

    def _post(self, path: str, idempotency_key: str | None) -> Job:
        return cast(Job, self._json("POST", path, headers=self._post_headers(idempotency_key)))

    def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 2.0) -> Job:
        """Poll until the job is completed, failed, cancelled or paused; returns it (check its `status`).

        A paused job waits for `resume`, so `wait` returns it rather than block. TimeoutError after `timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.get("status") in SETTLED_STATUSES:
                return job
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout} s")
            time.sleep(poll_interval)

    # -- events ------------------------------------------------------------------------------------------
    def events(
        self,
        job_id: str,
        *,
        after: int | None = None,
        on_drop: Callable[[Exception], None] | None = None,
    ) -> Iterator[Event]:
        """The job's events live (Server-Sent Events) from after event `after`, until the job ends.

        A dropped stream is resumed after the last event received (Last-Event-ID), with backoff; after
        MAX_STREAM_RETRIES drops in a row, StreamUnavailableError (poll with `wait` then). `on_drop` is
        told of each drop before the reconnect.
        """
        last_id = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                with self._http.stream(
                    "GET", f"/distillation/jobs/{job_id}/events", headers=headers, timeout=STREAM_TIMEOUT
                ) as response:
                    content_type = response.headers.get("content-type", "")
                    if response.status_code in (401, 403, 404, 409, 422):
                        response.read()
                        raise error_for(response.status_code, _problem(response), method="GET", path="events")
                    if response.is_error or not content_type.startswith("text/event-stream"):
                        raise StreamUnavailableError(
                            f"{response.status_code} {content_type or 'no content type'}"
                        )
                    for name, event_id, data in _iter_sse(response):
                        failures = 0
                        if event_id is not None:
                            last_id = event_id
                        if name == "end":
                            return
                        yield _event(name, event_id, data)
            except (httpx.TransportError, StreamUnavailableError) as exc:
                failures += 1
                if failures > MAX_STREAM_RETRIES:
                    raise StreamUnavailableError(str(exc) or exc.__class__.__name__) from exc
                if on_drop is not None:
                    on_drop(exc)
                time.sleep(min(2.0, 0.25 * 2 ** (failures - 1)))
                continue
            failures += 1  # closed without `end` (a proxy, a restart): reconnect after the last event
            if failures > MAX_STREAM_RETRIES:
                raise StreamUnavailableError("the stream kept closing before the job ended")

    # -- artifacts ---------------------------------------------------------------------------------------
    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        """The files a job wrote (empty until it completes)."""
        listing = self._json("GET", f"/distillation/jobs/{job_id}/artifacts")
        return cast(list[Artifact], listing["data"] if isinstance(listing, dict) else listing)

    def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str] = ".",
        *,
        names: builtins.list[str] | None = None,
        on_file: Callable[[Path, Artifact], None] | None = None,
    ) -> builtins.list[Path]:
        """Write the job's artifacts (or only `names`) into `dest`; returns the paths written.

        NoArtifactsError, and nothing created, when the job has none. Each file is written as
        `.<name>.part` and renamed when complete, so a dropped download never leaves a truncated file.
        """
        items = self.artifacts(job_id)
        if names is not None:
            items = [item for item in items if Path(item["name"]).name in names]
        if not items:
            raise NoArtifactsError(job_id, self.get(job_id).get("status"))
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for item in items:
            name = Path(item["name"]).name
            target = folder / name
            partial = folder / f".{name}.part"
            path = f"/distillation/jobs/{job_id}/artifacts/{name}"
            try:
                with self._stream_with_retries(path) as response, partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
            written.append(target)
            if on_file is not None:
                on_file(target, item)
        return written

    def _stream_with_retries(self, path: str) -> _OpenStream:
        def send() -> httpx.Response:
            return self._http.send(self._http.build_request("GET", path), stream=True)

        response = self._send_with_retries("GET", path, send)
        if response.is_error:
            response.read()
            response.close()
            raise error_for(response.status_code, _problem(response), method="GET", path=path)
        return _OpenStream(response)


class _OpenStream:
    """A streaming response as a context manager that closes it."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __enter__(self) -> httpx.Response:
        return self.response

    def __exit__(self, *exc: object) -> None:
        self.response.close()


def _iter_sse(response: httpx.Response) -> Iterator[tuple[str, int | None, str]]:
    """(event name, id, data) of each Server-Sent Event as it arrives; comments (keep-alives) skipped."""
    name, event_id, data_lines = "message", None, list[str]()
    for line in response.iter_lines():
        if not line:
            if data_lines:
                yield name, event_id, "\n".join(data_lines)
            name, event_id, data_lines = "message", None, []
            continue
        field_name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field_name == "event":
            name = value
        elif field_name == "id" and value.isdigit():
            event_id = int(value)
        elif field_name == "data":
            data_lines.append(value)


def _event(name: str, event_id: int | None, data: str) -> Event:
    raw = json.loads(data) if data else {}
    if not isinstance(raw, dict):
        raw = {"value": raw}
    if name == "snapshot":
        return Event(kind="snapshot", id=None, message="", data=raw, created_at=None, raw=raw)
    inner = raw.get("data")
    return Event(
        kind=name,
        id=event_id,
        message=str(raw.get("message") or ""),
        data=inner if isinstance(inner, dict) else {},
        created_at=raw.get("created_at"),
        raw=raw,
    )


__all__ = ["ApiError", "Artifact", "Client", "Event", "Job", "Page", "Retry", "RetryPolicy"]
