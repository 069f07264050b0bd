"""Admission under the concurrency limit, re-dispatch of unclaimed jobs, re-queue of stale ones.

Every decision is taken inside one database transaction, so the limit holds with any number of API,
scheduler and worker processes: on PostgreSQL admissions are serialised by `pg_advisory_xact_lock` (and the
queued rows are taken `FOR UPDATE SKIP LOCKED`); on SQLite every transaction is `BEGIN IMMEDIATE` (see
`app.core.db`). Celery messages are sent only after the transaction that decided them has committed, and
recovery never waits on the broker: a message nobody claimed is re-sent, a job whose heartbeat stopped is
re-queued (keeping its `queued_at`, so it goes first) or failed after MAX_ATTEMPTS.

Capacity: a job of `training_config.world_size` n > 1 is admitted only while some live worker offers n
devices (its heartbeat's `info.devices`); until then it stays queued (later, smaller jobs pass it), its read
says why (`queue_reason`) and a `queue` event said so when it was queued. An admitted job is sent to the
queue of its size (`training_queue`), which only workers with that many devices consume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, func, or_, select, text, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import ACTIVE_STATUSES, Job, JobEvent, JobStatus, utcnow
from app.services import heartbeats
from app.services.events import record_event, record_state_change

log = logging.getLogger(__name__)

# SQL: a job's ranks (training_config.world_size; 1 when the spec predates the field).
JOB_WORLD_SIZE = func.coalesce(Job.spec["training_config"]["world_size"].as_integer(), 1)

# pg_advisory_xact_lock key that serialises admission across processes ("dist" in ASCII).
ADMISSION_LOCK_KEY = 0x64697374
# Re-sends of one unclaimed message back off: DISPATCH_TIMEOUT x 2^n, n capped here.
_MAX_REDISPATCH_BACKOFF_EXPONENT = 5


@dataclass
class TickReport:
    """What one scheduler tick did."""

    admitted: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    send_errors: int = 0


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@dataclass(frozen=True)
class SlotUsage:
    """Slots held now: in total, and per owning tenant (unowned jobs count only toward the total)."""

    total: int
    by_tenant: dict[str, int]


def slots_held(session: Session) -> SlotUsage:
    """Jobs holding a slot (`ACTIVE_STATUSES`: dispatched, running, cancelling, pausing), in one query.

    The one place that decides which jobs hold a slot: the global and the per-tenant limit both read it.
    """
    rows = session.execute(
        select(Job.tenant_id, func.count()).where(Job.status.in_(ACTIVE_STATUSES)).group_by(Job.tenant_id)
    ).all()
    by_tenant = {str(tenant_id): int(count) for tenant_id, count in rows if tenant_id is not None}
    return SlotUsage(total=sum(int(count) for _, count in rows), by_tenant=by_tenant)


def count_active(session: Session) -> int:
    """Jobs holding a slot: dispatched, running, cancelling or pausing."""
    return slots_held(session).total


# The first `:limit` queued jobs after the cursor, in line order, among tenants not at their limit (and
# unowned jobs): per tenant with queued jobs (found by a loose index scan of ix_jobs_queue_by_tenant, one
# probe per tenant) its own first `:limit` in line, merged. Its cost grows with the number of tenants that
# have queued jobs, not with the queue: a full tenant's 100,000 queued rows are never visited. (The tenant
# leads the lateral's row comparison and order so that the planner, which cannot see how skewed tenants
# are, has only that index to serve them: walking ix_jobs_queue_order with a tenant filter is the slow
# plan this query exists to avoid.)
_HEADS_OF_ELIGIBLE_TENANTS = text(
    """
    WITH RECURSIVE queued_tenants(tenant_id) AS (
        SELECT min(tenant_id) FROM jobs WHERE status = :queued AND tenant_id IS NOT NULL
        UNION ALL
        SELECT (SELECT min(j.tenant_id) FROM jobs j WHERE j.status = :queued AND j.tenant_id > q.tenant_id)
        FROM queued_tenants q WHERE q.tenant_id IS NOT NULL
    )
    SELECT head.id, head.queued_at FROM queued_tenants q CROSS JOIN LATERAL (
        SELECT j.id, j.queued_at FROM jobs j
        WHERE j.status = :queued AND j.tenant_id = q.tenant_id
          AND (j.tenant_id, j.queued_at, j.id) > (q.tenant_id, :after_at, :after_id)
          AND COALESCE((j.spec->'training_config'->>'world_size')::int, 1) <= :max_world_size
        ORDER BY j.tenant_id, j.queued_at, j.id LIMIT :limit
    ) AS head
    WHERE q.tenant_id IS NOT NULL AND q.tenant_id NOT IN :skip
    UNION ALL
    (SELECT j.id, j.queued_at FROM jobs j
     WHERE j.status = :queued AND j.tenant_id IS NULL AND (j.queued_at, j.id) > (:after_at, :after_id)
       AND COALESCE((j.spec->'training_config'->>'world_size')::int, 1) <= :max_world_size
     ORDER BY j.queued_at, j.id LIMIT :limit)
    ORDER BY queued_at, id LIMIT :limit
    """
).bindparams(bindparam("skip", expanding=True))
# (queued_at, id) of the last job a page considered (every queued job has a queued_at).
_Cursor = tuple[datetime | None, str]
# (id, tenant_id, queued_at) of a queued job.
_QueueRow = Row[str, str | None, datetime | None]
# Before every real queued_at: the cursor of a first page.
_START_OF_QUEUE = (datetime(1970, 1, 1, tzinfo=UTC), "")


def _queued_candidates(
    session: Session,
    *,
    limit: int,
    after: _Cursor | None,
    skip_tenants: Iterable[str],
    postgres: bool,
    max_world_size: int = 1,
) -> tuple[list[_QueueRow], _Cursor | None]:
    """The next `limit` queued jobs in line (queued_at, id) after `after`, leaving out `skip_tenants` and
    jobs of more than `max_world_size` ranks (no live worker could take them).

    Returns (rows of id, tenant_id, queued_at; the cursor after the last job considered). Without tenants to
    skip this is one page of `ix_jobs_queue_order`. With some (PostgreSQL), the page is the merged heads of
    the other tenants' queues (`_HEADS_OF_ELIGIBLE_TENANTS`), so full tenants cost nothing to skip;
    SQLite, the embedded single-machine default, filters them while walking the queue. On PostgreSQL the
    rows returned are locked `FOR UPDATE SKIP LOCKED`: only these rows, never the whole queue.
    """
    skipped = sorted(skip_tenants)
    if postgres and skipped:
        start_at, start_id = after or _START_OF_QUEUE
        heads = session.execute(
            _HEADS_OF_ELIGIBLE_TENANTS,
            {
                "queued": JobStatus.queued.value,
                "after_at": start_at,
                "after_id": start_id,
                "limit": limit,
                "skip": skipped,
                "max_world_size": max_world_size,
            },
        ).all()
        if not heads:
            return [], after
        locked = (
            select(Job.id, Job.tenant_id, Job.queued_at)
            .where(Job.id.in_([row.id for row in heads]), Job.status == JobStatus.queued)
            .order_by(Job.queued_at, Job.id)
            .with_for_update(skip_locked=True)
        )
        return list(session.execute(locked).all()), (heads[-1].queued_at, heads[-1].id)
    stmt = select(Job.id, Job.tenant_id, Job.queued_at).where(
        Job.status == JobStatus.queued,
        JOB_WORLD_SIZE <= max_world_size,  # noqa: SIM300 (a SQL expression, not a constant)
    )
    if skipped:
        stmt = stmt.where(or_(Job.tenant_id.is_(None), Job.tenant_id.not_in(skipped)))
    if after is not None:
        stmt = stmt.where(tuple_(Job.queued_at, Job.id) > tuple_(*after))
    stmt = stmt.order_by(Job.queued_at, Job.id).limit(limit)
    if postgres:
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.execute(stmt).all())
    return rows, ((rows[-1].queued_at, rows[-1].id) if rows else after)


def admit_queued_jobs(session: Session, settings: Settings) -> list[str]:
    """Move queued jobs to `dispatched` in queued_at order while fewer than the limit are active.

    A job whose tenant already holds TENANT_MAX_RUNNING_JOBS slots waits (later jobs of other tenants may
    pass it); the counts are read under the same lock, so both limits hold across processes.
    The queue is read a page at a time, each page only as long as the slots still free, with the tenants
    already at their limit left out in the query (`_queued_candidates`): a tick costs the same with 100 or
    100,000 jobs queued, and locks only the rows it may admit.
    The caller commits, then sends one message per returned id.
    """
    postgres = _is_postgres(session)
    if postgres:
        session.execute(select(func.pg_advisory_xact_lock(ADMISSION_LOCK_KEY)))
    usage = slots_held(session)
    free = settings.max_concurrent_jobs - usage.total
    if free <= 0:
        return []
    # The largest job some live worker can take (jobs of one rank are always sent: any worker takes them).
    capacity = max(1, heartbeats.max_live_devices(session, within_seconds=settings.heartbeat_timeout))
    tenant_limit = settings.effective_tenant_max_running_jobs
    held = dict(usage.by_tenant)
    full = {tenant_id for tenant_id, count in held.items() if count >= tenant_limit}
    now = utcnow()
    admitted: list[str] = []
    after: _Cursor | None = None
    while len(admitted) < free:
        page, after = _queued_candidates(
            session,
            limit=free - len(admitted),
            after=after,
            skip_tenants=full,
            postgres=postgres,
            max_world_size=capacity,
        )
        if not page:
            break
        for job_id, tenant_id, _queued_at in page:
            if tenant_id is not None and tenant_id in full:
                continue  # became full earlier in this page
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued)
                .values(status=JobStatus.dispatched, dispatched_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                continue
            admitted.append(job_id)
            record_state_change(session, job_id=job_id, old=JobStatus.queued, new=JobStatus.dispatched)
            if tenant_id is not None:
                held[tenant_id] = held.get(tenant_id, 0) + 1
                if held[tenant_id] >= tenant_limit:
                    full.add(tenant_id)
    return admitted


def _send(job_ids: list[str]) -> int:
    """Send one run message per job id; returns how many sends failed (the scheduler re-sends those)."""
    from app.core.celery_client import send_run_job

    errors = 0
    world_sizes = _world_sizes(job_ids)
    for job_id in job_ids:
        try:
            send_run_job(job_id, world_size=world_sizes.get(job_id, 1))
        except Exception as exc:  # kombu raises many transport-specific errors; re-send covers them all
            errors += 1
            log.error(
                "could not send job %s to the broker (will re-send after DISPATCH_TIMEOUT): %s", job_id, exc
            )
    return errors


def _world_sizes(job_ids: list[str]) -> dict[str, int]:
    """Each job's ranks, for routing (one query; none when there is nothing to send)."""
    if not job_ids:
        return {}
    with session_scope() as session:
        rows = session.execute(select(Job.id, JOB_WORLD_SIZE).where(Job.id.in_(job_ids))).all()
    return {str(job_id): int(size) for job_id, size in rows}


def capacity_wait_reason(world_size: int, live_devices: int | None) -> str | None:
    """Why a queued job of `world_size` ranks cannot be admitted now (None: it can)."""
    if world_size <= 1 or live_devices is None or world_size <= live_devices:
        return None
    largest = f"the largest offers {live_devices}" if live_devices else "no worker is live"
    return (
        f"waiting for a worker with {world_size} devices (training_config.world_size): {largest}; start a "
        f"worker with WORKER_DEVICES={world_size} (CPU) or {world_size} GPUs, or lower world_size"
    )


def note_capacity_wait(session: Session, *, job: Job, settings: Settings) -> str | None:
    """Record a `queue` event when a just-queued job is larger than every live worker; its reason."""
    world_size = int(((job.spec or {}).get("training_config") or {}).get("world_size") or 1)
    if world_size <= 1:
        return None
    live = heartbeats.max_live_devices(session, within_seconds=settings.heartbeat_timeout)
    reason = capacity_wait_reason(world_size, live)
    if reason is not None:
        record_event(
            session,
            job_id=job.id,
            kind="queue",
            message=reason,
            data={"world_size": world_size, "live_devices": live},
            attempt=job.attempt,
        )
    return reason


def admit_and_dispatch(settings: Settings | None = None) -> list[str]:
    """Admit queued jobs (queued_at order) while fewer than MAX_CONCURRENT_JOBS are active, commit,
    then send one Celery task per admitted job. Returns the admitted job ids. Safe to call from any
    process at any time (API after a start, worker after a job's end, the scheduler's tick)."""
    settings = settings or get_settings()
    with session_scope() as session:
        admitted = admit_queued_jobs(session, settings)
    _send(admitted)
    return admitted


def redispatch_unclaimed(session: Session, settings: Settings) -> list[str]:
    """Dispatched jobs nobody claimed within DISPATCH_TIMEOUT (backing off per re-send): refresh
    `dispatched_at` and return their ids; the caller commits, then sends them again."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.dispatch_timeout)
    rows = session.execute(
        select(Job.id, Job.attempt, Job.dispatched_at).where(
            Job.status == JobStatus.dispatched, Job.dispatched_at < cutoff
        )
    ).all()
    resent: list[str] = []
    for row in rows:
        previous = int(
            session.scalar(
                select(func.count())
                .select_from(JobEvent)
                .where(
                    JobEvent.job_id == row.id, JobEvent.kind == "dispatch", JobEvent.attempt == row.attempt
                )
            )
            or 0
        )
        wait = settings.dispatch_timeout * 2 ** min(previous, _MAX_REDISPATCH_BACKOFF_EXPONENT)
        if row.dispatched_at > now - timedelta(seconds=wait):
            continue
        result = session.execute(
            update(Job)
            .where(
                Job.id == row.id, Job.status == JobStatus.dispatched, Job.dispatched_at == row.dispatched_at
            )
            .values(dispatched_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        record_event(
            session,
            job_id=row.id,
            kind="dispatch",
            message=f"re-sent: no worker claimed it within {wait:.0f} s",
            data={"resend": previous + 1, "waited_seconds": wait},
            attempt=row.attempt,
        )
        resent.append(row.id)
    return resent


def requeue_stale(session: Session, settings: Settings) -> tuple[list[str], list[str]]:
    """Running jobs whose heartbeat is older than HEARTBEAT_TIMEOUT go back to `queued` (keeping their
    queued_at, so they are admitted first, and losing their lease), or fail with `max_attempts` once
    `attempt >= MAX_ATTEMPTS`. Returns (requeued ids, failed ids)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout)
    stmt = select(Job.id, Job.attempt, Job.pause_count, Job.worker, Job.heartbeat_at).where(
        Job.status == JobStatus.running, Job.heartbeat_at < cutoff
    )
    if _is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    requeued: list[str] = []
    failed: list[str] = []
    for row in session.execute(stmt).all():
        guard = update(Job).where(
            Job.id == row.id, Job.status == JobStatus.running, Job.heartbeat_at == row.heartbeat_at
        )
        silent = (now - row.heartbeat_at).total_seconds()
        if row.attempt - row.pause_count >= settings.max_attempts:  # a pause's claim is no failed attempt
            error = {
                "code": "max_attempts",
                "message": (
                    f"the job's worker stopped responding on attempt {row.attempt} of "
                    f"{settings.max_attempts} "
                    f"(last worker {row.worker}, silent for {silent:.0f} s); it is not retried again"
                ),
            }
            values = {
                "status": JobStatus.failed,
                "error": error,
                "lease_token": None,
                "finished_at": now,
                "eta_seconds": None,
                "updated_at": now,
            }
            result = session.execute(guard.values(**values).execution_options(synchronize_session=False))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                failed.append(row.id)
                record_state_change(
                    session,
                    job_id=row.id,
                    old=JobStatus.running,
                    new=JobStatus.failed,
                    attempt=row.attempt,
                    reason="max_attempts",
                    error=error,
                )
            continue
        result = session.execute(
            guard.values(
                status=JobStatus.queued,
                lease_token=None,
                worker=None,
                dispatched_at=None,
                heartbeat_at=None,
                eta_seconds=None,
                updated_at=now,
            ).execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            requeued.append(row.id)
            record_state_change(
                session,
                job_id=row.id,
                old=JobStatus.running,
                new=JobStatus.queued,
                attempt=row.attempt,
                reason="heartbeat_stale",
                worker=row.worker,
                silent_seconds=round(silent, 1),
            )
    return requeued, failed


def finish_abandoned_cancels(session: Session, settings: Settings) -> list[str]:
    """`cancelling` jobs no worker will finish: never claimed (no lease) or heartbeat stale → cancelled."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout)
    rows = session.execute(
        select(Job.id, Job.attempt, Job.lease_token).where(
            Job.status == JobStatus.cancelling,
            (Job.lease_token.is_(None)) | (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff),
        )
    ).all()
    cancelled: list[str] = []
    for row in rows:
        result = session.execute(
            update(Job)
            .where(Job.id == row.id, Job.status == JobStatus.cancelling)
            .where(
                Job.lease_token.is_(None) if row.lease_token is None else Job.lease_token == row.lease_token
            )
            .values(
                status=JobStatus.cancelled,
                lease_token=None,
                finished_at=now,
                eta_seconds=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            cancelled.append(row.id)
            reason = "never claimed" if row.lease_token is None else "worker stopped responding"
            record_state_change(
                session,
                job_id=row.id,
                old=JobStatus.cancelling,
                new=JobStatus.cancelled,
                attempt=row.attempt,
                reason=reason,
            )
    return cancelled


def finish_abandoned_pauses(session: Session, settings: Settings) -> list[str]:
    """`pausing` jobs whose worker stopped beating → paused: the slot is freed, the last checkpoint kept."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout)
    rows = session.execute(
        select(Job.id, Job.attempt, Job.lease_token).where(
            Job.status == JobStatus.pausing, (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff)
        )
    ).all()
    paused: list[str] = []
    for row in rows:
        result = session.execute(
            update(Job)
            .where(Job.id == row.id, Job.status == JobStatus.pausing)
            .where(
                Job.lease_token.is_(None) if row.lease_token is None else Job.lease_token == row.lease_token
            )
            .values(
                status=JobStatus.paused,
                lease_token=None,
                worker=None,
                dispatched_at=None,
                heartbeat_at=None,
                eta_seconds=None,
                pause_count=Job.pause_count + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            paused.append(row.id)
            record_state_change(
                session,
                job_id=row.id,
                old=JobStatus.pausing,
                new=JobStatus.paused,
                attempt=row.attempt,
                reason="worker stopped responding",
            )
    return paused


def run_tick(settings: Settings | None = None, *, scheduler_id: str | None = None) -> TickReport:
    """One scheduler pass: recover stale and abandoned jobs, re-send unclaimed ones, admit, beat."""
    settings = settings or get_settings()
    report = TickReport()
    with session_scope() as session:
        report.requeued, report.failed = requeue_stale(session, settings)
        report.cancelled = finish_abandoned_cancels(session, settings)
        report.paused = finish_abandoned_pauses(session, settings)
    with session_scope() as session:
        report.redispatched = redispatch_unclaimed(session, settings)
    report.send_errors += _send(report.redispatched)
    with session_scope() as session:
        report.admitted = admit_queued_jobs(session, settings)
    report.send_errors += _send(report.admitted)
    if scheduler_id is not None:
        with session_scope() as session:
            heartbeats.beat(
                session, kind="scheduler", sid=scheduler_id, info={"tick_seconds": settings.tick_seconds}
            )
    return report
