"""A job's events as a Server-Sent Events stream, read from the database by short polls.

Each poll opens its own short session in a worker thread and closes it before sleeping, so a stream never
holds a connection, a transaction or (on SQLite) the write lock while it waits. Events go out as
`id: <event id>`, `event: <kind>`, `data: <JobEventRead JSON>`; a `snapshot` event (no id) carries the job's
latest status, progress, phase, ETA and metrics whenever the job row changed; `end` (no id) closes the
stream once the job is in a terminal state and every event before it was sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import get_sessionmaker
from app.models import TERMINAL_STATUSES, Job, JobEvent, JobStatus
from app.schemas.jobs import JobEventRead

# Events per poll; a longer backlog is sent over several polls without sleeping in between.
BATCH_SIZE = 500
# On PostgreSQL ids come from a sequence, so a transaction can commit an id below one already sent. Each
# poll re-reads ids above the highest one sent at least this long ago and skips those already sent.
LATE_COMMIT_WINDOW_SECONDS = 5.0
CLIENT_RETRY_MS = 2000


@dataclass(frozen=True)
class _Poll:
    """One look at the database: the job's row (None once deleted) and new events."""

    job: dict[str, Any] | None
    events: list[JobEventRead]


def _job_snapshot(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "status": job.status,
        "progress": job.progress,
        "phase": job.phase,
        "eta_seconds": job.eta_seconds,
        "attempt": job.attempt,
        "metrics": job.metrics,
        "updated_at": job.updated_at.isoformat() if job.updated_at else None,
    }


def _poll(job_id: str, after: int, skip: frozenset[int]) -> _Poll:
    """The job's row, then its events with id > `after` not in `skip` (row first: see `stream_job_events`)."""
    session: Session = get_sessionmaker()()
    try:
        job = session.get(Job, job_id)
        snapshot = _job_snapshot(job) if job is not None else None
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(BATCH_SIZE + len(skip))
        ).all()
        events = [JobEventRead.model_validate(r, from_attributes=True) for r in rows if r.id not in skip]
        session.rollback()  # read-only: end the transaction (and SQLite's lock) before the session closes
        return _Poll(job=snapshot, events=events[:BATCH_SIZE])
    finally:
        session.close()


def format_event(*, data: Any, event: str | None = None, event_id: int | None = None) -> str:
    """One SSE message; `data` is sent as compact JSON on a single line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return "\n".join(lines) + "\n\n"


# Where a job's stream ends: a final state, or paused (nothing moves until a resume).
_STREAM_END_STATUSES = frozenset({*TERMINAL_STATUSES, JobStatus.paused})


async def stream_job_events(
    job_id: str, *, after: int, poll_seconds: float, keepalive_seconds: float
) -> AsyncIterator[str]:
    """SSE messages for `job_id`'s events with id > `after`, live, until the job is terminal or paused.

    A paused job does nothing until someone resumes it, so its stream ends too (`end` names the status); a
    client that resumes the job opens a new stream (Last-Event-ID carries on where this one stopped).

    The job row is read before the events in the same poll, so when the row says terminal every event
    committed with (or before) that final transition is in the same read: the stream ends after them.
    """
    yield f"retry: {CLIENT_RETRY_MS}\n\n"
    floor = after  # ids <= floor were sent (or skipped by the client's Last-Event-ID)
    sent: dict[int, float] = {}  # ids above the floor already sent -> when
    last_snapshot: dict[str, Any] | None = None
    last_output = time.monotonic()
    while True:
        poll = await anyio.to_thread.run_sync(_poll, job_id, floor, frozenset(sent))
        now = time.monotonic()
        if poll.job is None:
            yield format_event(event="end", data={"job_id": job_id, "status": None, "reason": "deleted"})
            return
        for event in poll.events:
            yield format_event(event=event.kind, event_id=event.id, data=event.model_dump(mode="json"))
            sent[event.id] = now
            last_output = now
        if poll.job != last_snapshot:
            last_snapshot = poll.job
            yield format_event(event="snapshot", data=poll.job)
            last_output = now
        if poll.job["status"] in _STREAM_END_STATUSES and len(poll.events) < BATCH_SIZE:
            yield format_event(event="end", data={"job_id": job_id, "status": poll.job["status"]})
            return
        settled = [i for i, at in sent.items() if now - at >= LATE_COMMIT_WINDOW_SECONDS]
        if settled:
            floor = max(floor, max(settled))
            sent = {i: at for i, at in sent.items() if i > floor}
        if len(poll.events) >= BATCH_SIZE:
            continue  # more backlog: no sleep
        if now - last_output >= keepalive_seconds:
            yield ": keep-alive\n\n"
            last_output = now
        await anyio.sleep(min(poll_seconds, keepalive_seconds))
