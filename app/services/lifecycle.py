"""Worker-side job transitions: claim, heartbeat, progress, finish, fail, cancel — all lease-guarded.

The claim is a compare-and-set on `status='dispatched'` that bumps `attempt` and hands out a fresh lease
token; every later write by that worker carries `WHERE id=:id AND lease_token=:token`, so a worker whose
job was re-queued (lease cleared by the scheduler) or re-claimed elsewhere can no longer change it.
"""

from __future__ import annotations

import hashlib
import mimetypes
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import case, delete, func, literal, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from app.models import Artifact, Job, JobStatus, UTCDateTime, utcnow
from app.services.events import record_event, record_state_change

# Statuses in which a lease holder may still write (cancelling/pausing: it is finishing its last step).
_HELD_STATUSES = (JobStatus.running, JobStatus.cancelling, JobStatus.pausing)
# Where a worker that stopped on request leaves the job: the request decides.
_STOPPED_TO = {JobStatus.cancelling: JobStatus.cancelled, JobStatus.pausing: JobStatus.paused}


@dataclass(frozen=True)
class Claim:
    """What a worker got by claiming a job: the attempt number and the lease token guarding its writes."""

    job_id: str
    attempt: int
    lease_token: str
    worker: str
    spec: dict[str, Any]
    teacher_model_name: str


@dataclass(frozen=True)
class LeaseState:
    """The job's status as seen by a lease holder; `held` is False once the lease was taken away."""

    status: str | None
    held: bool

    @property
    def should_stop(self) -> bool:
        return not self.held or self.status in (JobStatus.cancelling, JobStatus.pausing)


@dataclass(frozen=True)
class ArtifactFile:
    """An artifact file on disk, described for the `artifacts` table."""

    name: str
    path: Path
    size_bytes: int
    sha256: str
    media_type: str


def describe_artifact(path: Path) -> ArtifactFile:
    """Size, sha256 and media type of one artifact file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return ArtifactFile(
        name=path.name,
        path=path,
        size_bytes=path.stat().st_size,
        sha256=digest.hexdigest(),
        media_type=media_type,
    )


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def claim_job(session: Session, *, job_id: str, worker: str) -> Claim | None:
    """Compare-and-set `dispatched → running` with attempt + 1 and a new lease; None if not claimable."""
    now = utcnow()
    token = str(uuid.uuid4())
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.dispatched)
        .values(
            status=JobStatus.running,
            attempt=Job.attempt + 1,
            lease_token=token,
            worker=worker,
            started_at=func.coalesce(Job.started_at, literal(now, type_=UTCDateTime())),
            heartbeat_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        return None
    row = session.execute(select(Job.attempt, Job.spec, Job.teacher_model_name).where(Job.id == job_id)).one()
    attempt = int(row.attempt)
    record_event(
        session,
        job_id=job_id,
        kind="claim",
        message=f"claimed by {worker} (attempt {attempt})",
        data={"attempt": attempt, "lease_token": token, "worker": worker, "at": now.isoformat()},
        attempt=attempt,
    )
    record_state_change(
        session,
        job_id=job_id,
        old=JobStatus.dispatched,
        new=JobStatus.running,
        attempt=attempt,
        worker=worker,
    )
    return Claim(
        job_id=job_id,
        attempt=attempt,
        lease_token=token,
        worker=worker,
        spec=dict(row.spec),
        teacher_model_name=str(row.teacher_model_name),
    )


def _guarded(job_id: str, lease_token: str) -> Any:
    return (
        update(Job)
        .where(Job.id == job_id, Job.lease_token == lease_token)
        .execution_options(synchronize_session=False)
    )


def heartbeat(session: Session, *, job_id: str, lease_token: str) -> bool:
    """Refresh `heartbeat_at` while the lease is held and the job is live; False when the lease is lost."""
    now = utcnow()
    result = session.execute(
        _guarded(job_id, lease_token)
        .where(Job.status.in_(_HELD_STATUSES))
        .values(heartbeat_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


def update_progress(
    session: Session,
    *,
    job_id: str,
    lease_token: str,
    progress: float,
    phase: str | None,
    eta_seconds: float | None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """Write progress (0-100), phase, ETA and the latest metrics; also refreshes the heartbeat.

    Progress never goes down, across attempts too: a re-queued job resumes from its checkpoint, so the
    stored figure only moves once the new attempt passes it (the CASE keeps it one portable statement).
    """
    now = utcnow()
    clamped = max(0.0, min(100.0, progress))
    values: dict[str, Any] = {
        "progress": case((func.coalesce(Job.progress, 0.0) > clamped, Job.progress), else_=clamped),
        "phase": phase,
        "eta_seconds": eta_seconds,
        "heartbeat_at": now,
        "updated_at": now,
    }
    if metrics is not None:
        values["metrics"] = metrics
    result = session.execute(
        _guarded(job_id, lease_token).where(Job.status.in_(_HELD_STATUSES)).values(**values)
    )
    return _rowcount(result) == 1


def record_event_if_held(
    session: Session,
    *,
    job_id: str,
    lease_token: str,
    kind: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    attempt: int = 0,
) -> bool:
    """Append an event only while `lease_token` holds the job; False once the lease is gone.

    The guarded heartbeat update locks the job row until commit, so a takeover cannot slip in between the
    check and the insert: a worker whose lease was taken writes no more history.
    """
    now = utcnow()
    result = session.execute(
        _guarded(job_id, lease_token)
        .where(Job.status.in_(_HELD_STATUSES))
        .values(heartbeat_at=now, updated_at=now)
    )
    if _rowcount(result) != 1:
        return False
    record_event(session, job_id=job_id, kind=kind, message=message, data=data, attempt=attempt)
    return True


def read_lease(session: Session, *, job_id: str, lease_token: str) -> LeaseState:
    """The job's status and whether `lease_token` still holds it."""
    row = session.execute(select(Job.status, Job.lease_token).where(Job.id == job_id)).one_or_none()
    if row is None:
        return LeaseState(status=None, held=False)
    held = row.lease_token == lease_token and row.status in _HELD_STATUSES
    return LeaseState(status=str(row.status), held=held)


def complete_job(
    session: Session,
    *,
    job_id: str,
    lease_token: str,
    attempt: int,
    results: dict[str, Any],
    artifacts: list[ArtifactFile],
    estimate: dict[str, Any] | None = None,
) -> bool:
    """Store results and artifact rows and mark the job completed, if the lease still holds it and nobody
    asked to cancel it (`estimate`: the job's estimate with what it measured, replacing the stored one).

    A `cancelling` job is not completed: the cancel came after the engine's last stop check, and the
    client was told it would be cancelled (a `job.completed` webhook could deploy what it cancelled). The
    worker ends it with `cancel_stopped_job` instead. A `pausing` job completes: nothing is left to resume.
    """
    now = utcnow()
    extra: dict[str, Any] = {"estimate": estimate} if estimate is not None else {}
    old = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    result = session.execute(
        _guarded(job_id, lease_token)
        .where(Job.status.in_((JobStatus.running, JobStatus.pausing)))
        .values(
            status=JobStatus.completed,
            results=results,
            error=None,
            progress=100.0,
            eta_seconds=0.0,
            finished_at=now,
            heartbeat_at=now,
            updated_at=now,
            **extra,
        )
    )
    if _rowcount(result) != 1:
        return False
    names = [artifact.name for artifact in artifacts]
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name.in_(names)))
    for artifact in artifacts:
        session.add(
            Artifact(
                job_id=job_id,
                name=artifact.name,
                path=str(artifact.path),
                size_bytes=artifact.size_bytes,
                sha256=artifact.sha256,
                media_type=artifact.media_type,
                created_at=now,
            )
        )
    record_state_change(
        session, job_id=job_id, old=str(old or JobStatus.running), new=JobStatus.completed, attempt=attempt
    )
    return True


def fail_job(
    session: Session, *, job_id: str, lease_token: str, attempt: int, code: str, message: str
) -> bool:
    """Mark the job failed with `error: {code, message}`, if the lease still holds it."""
    now = utcnow()
    old = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    error = {"code": code, "message": message}
    result = session.execute(
        _guarded(job_id, lease_token)
        .where(Job.status.in_(_HELD_STATUSES))
        .values(status=JobStatus.failed, error=error, eta_seconds=None, finished_at=now, updated_at=now)
    )
    if _rowcount(result) != 1:
        return False
    record_state_change(
        session,
        job_id=job_id,
        old=str(old or JobStatus.running),
        new=JobStatus.failed,
        attempt=attempt,
        reason=code,
        error=error,
    )
    return True


def cancel_stopped_job(
    session: Session, *, job_id: str, lease_token: str, attempt: int, reason: str = "stopped by worker"
) -> bool:
    """A worker stopped on request: `cancelling → cancelled`, if the lease still holds it."""
    return _end_stopped(session, job_id, lease_token, attempt, JobStatus.cancelling, reason) is not None


def end_stopped_job(session: Session, *, job_id: str, lease_token: str, attempt: int) -> str | None:
    """A worker stopped on request: `cancelling → cancelled` or `pausing → paused`, as was asked, if the
    lease still holds it. Returns the new status, None when the lease is gone (or nothing was asked).

    Paused releases the lease and the slot and keeps the checkpoint, so a resume continues from it on any
    worker; the pause is counted so it never uses up MAX_ATTEMPTS.
    """
    for _ in range(3):  # a cancel may turn pausing into cancelling between the read and the write
        status = session.execute(
            select(Job.status).where(Job.id == job_id, Job.lease_token == lease_token)
        ).scalar_one_or_none()
        if status not in _STOPPED_TO:
            return None
        ended = _end_stopped(session, job_id, lease_token, attempt, JobStatus(status))
        if ended is not None:
            return ended
    return None


def _end_stopped(
    session: Session,
    job_id: str,
    lease_token: str,
    attempt: int,
    current: JobStatus,
    reason: str = "stopped by worker",
) -> str | None:
    now = utcnow()
    target = _STOPPED_TO[current]
    values: dict[str, Any] = {"status": target, "eta_seconds": None, "updated_at": now}
    if target == JobStatus.cancelled:
        values["finished_at"] = now
    else:
        values |= {
            "lease_token": None,
            "worker": None,
            "dispatched_at": None,
            "heartbeat_at": None,
            "pause_count": Job.pause_count + 1,
        }
    result = session.execute(_guarded(job_id, lease_token).where(Job.status == current).values(**values))
    if _rowcount(result) != 1:
        return None
    record_state_change(session, job_id=job_id, old=current, new=target, attempt=attempt, reason=reason)
    return str(target)
