"""The job event log: append and page through state, progress, metric and claim events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import JobEvent


def record_event(
    session: Session,
    *,
    job_id: str,
    kind: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    attempt: int = 0,
) -> JobEvent:
    """Add one event to `session` (committed with the caller's transaction)."""
    event = JobEvent(job_id=job_id, kind=kind, message=message, data=data or {}, attempt=attempt)
    session.add(event)
    return event


def record_state_change(
    session: Session,
    *,
    job_id: str,
    old: str,
    new: str,
    attempt: int = 0,
    reason: str = "",
    **extra: Any,
) -> JobEvent:
    """A `state` event for a transition `old` -> `new` (data: from, to, reason when given, extras).

    An end or a pause also writes the tenant's webhook deliveries, in this same transaction.
    """
    from app.services.webhooks import enqueue_for_transition

    data: dict[str, Any] = {"from": old, "to": new, **extra}
    if reason:
        data["reason"] = reason
    message = f"{old} -> {new}" + (f": {reason}" if reason else "")
    event = record_event(session, job_id=job_id, kind="state", message=message, data=data, attempt=attempt)
    enqueue_for_transition(session, job_id=job_id, new_status=new)
    return event


def list_events(session: Session, *, job_id: str, after: int, limit: int) -> tuple[list[JobEvent], bool]:
    """Events of a job with id > `after`, in id order; returns (events, has_more)."""
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit + 1)
    ).all()
    return list(rows[:limit]), len(rows) > limit
