"""Jobs: create (with settings-dependent checks), start, cancel, delete, read and page through them.

Every state change is a compare-and-set on the current status, so the API never overwrites a change the
scheduler or a worker made in between.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Conflict, NotFound, QuotaExceeded, Unprocessable
from app.models import TERMINAL_STATUSES, Job, JobStatus, Teacher, utcnow
from app.schemas.job_spec import FileDataset, JobSpec, Task, UploadedDataset
from app.schemas.jobs import JobCreate, JobError, JobRead, JobSummary
from app.services import datasets as datasets_service
from app.services import teachers as teachers_service
from app.services.events import record_event, record_state_change

logger = logging.getLogger("distillery.jobs")

_LABELLED_TASKS = (Task.classification, Task.sequence_classification)
_STATE_CHANGE_RETRIES = 5


# ----------------------------------------------------------------------------------------------- create


def _field_error(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "field": ".".join(str(p) for p in loc), "msg": msg, "type": kind}


# Teacher types whose models the transformers-based tasks load; 'cnn' teachers serve `classification` only.
_TEXT_TEACHER_TASKS = {
    "transformer": Task.sequence_classification,
    "causal_lm": Task.causal_lm,
    "masked_lm": Task.masked_lm,
}


def _teacher_task_mismatch(teacher: Teacher, task: Task) -> tuple[str, str] | None:
    """(message, task to use) when the engine could not run `task` with `teacher`, else None.

    The engine's `classification` takes the built-in digits-cnn or a local small CNN/tabular model, never a
    hub or transformers model; the text tasks load transformers models, never a built-in or 'cnn' teacher.
    Caught here, a job that would fail in the worker is refused at create.
    """
    text_task = _TEXT_TEACHER_TASKS.get(teacher.type)
    default = Task(teacher.task) if teacher.task in set(Task) else None
    if task == Task.classification and (text_task is not None or teacher.source_kind == "hub"):
        use = default if default not in (None, Task.classification) else text_task
        advice = f"use task '{use}'" if use else "register the model as a local directory instead"
        return (
            f"Teacher '{teacher.name}' is a {teacher.source_kind} {teacher.type} model; task "
            f"'classification' is for the built-in digits-cnn and local CNN/tabular teachers: {advice}",
            str(use or ""),
        )
    if task != Task.classification and (text_task is None or teacher.source_kind == "builtin"):
        return (
            f"Teacher '{teacher.name}' is a {teacher.source_kind} {teacher.type} model; task '{task}' "
            "needs a transformers teacher (hub id or local directory): use task 'classification' with "
            "this teacher",
            str(Task.classification),
        )
    return None


def check_spec(session: Session, *, spec: JobSpec, settings: Settings, tenant_id: str | None) -> JobSpec:
    """Checks that need the database or settings: teacher, dataset, caps. Returns the spec to store.

    Only the tenant's own teachers and datasets (and the global seeded teachers) can be named.

    A `file` dataset's path is stored resolved (symlinks followed), so the worker reads the file checked here.
    """
    errors: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    training = spec.training_config
    if training.epochs > settings.max_epochs:
        errors.append(
            _field_error(
                ["training_config", "epochs"],
                f"Input should be less than or equal to {settings.max_epochs} (MAX_EPOCHS)",
                "less_than_equal",
            )
        )
    if training.batch_size > settings.max_batch_size:
        errors.append(
            _field_error(
                ["training_config", "batch_size"],
                f"Input should be less than or equal to {settings.max_batch_size} (MAX_BATCH_SIZE)",
                "less_than_equal",
            )
        )
    teacher = teachers_service.get(session, name=spec.teacher_model_name, tenant_id=tenant_id)
    mismatch = _teacher_task_mismatch(teacher, spec.task) if teacher is not None else None
    if mismatch is not None:
        extras["suggested_task"] = mismatch[1]
        errors.append(_field_error(["task"], mismatch[0], "teacher_task_mismatch"))
    if teacher is None:
        names = teachers_service.valid_names(session, tenant_id=tenant_id)
        extras["valid_teachers"] = names
        errors.append(
            _field_error(
                ["teacher_model_name"],
                f"Unknown teacher '{spec.teacher_model_name}'; "
                f"valid teachers: {', '.join(names) or '(none)'} "
                "(GET /distillation/teachers; register others with POST /distillation/teachers)",
                "unknown_teacher",
            )
        )
    dataset = spec.dataset_config
    if isinstance(dataset, UploadedDataset):
        uploaded = datasets_service.get(session, dataset_id=dataset.dataset_id, tenant_id=tenant_id)
        if uploaded is None:
            errors.append(
                _field_error(
                    ["dataset_config", "dataset_id"],
                    f"Unknown dataset '{dataset.dataset_id}'; GET /distillation/datasets lists the uploaded "
                    "datasets (upload with POST /distillation/datasets)",
                    "unknown_dataset",
                )
            )
        elif spec.task in _LABELLED_TASKS and (uploaded.columns or {}).get("num_labels") is None:
            errors.append(
                _field_error(
                    ["dataset_config", "dataset_id"],
                    f"Dataset '{dataset.dataset_id}' has no 'label' column; task '{spec.task}' needs labels",
                    "missing_labels",
                )
            )
    elif isinstance(dataset, FileDataset):
        root = settings.file_root
        try:
            resolved = teachers_service.resolve_under_root(dataset.path, root, what="Dataset path")
        except Unprocessable as exc:
            errors.append(_field_error(["dataset_config", "path"], exc.detail, "path_outside_root"))
        else:
            if not resolved.is_file():
                errors.append(
                    _field_error(
                        ["dataset_config", "path"],
                        f"No file at {resolved} (paths are relative to the allowed root {root})",
                        "file_not_found",
                    )
                )
            else:
                spec = spec.model_copy(
                    update={"dataset_config": dataset.model_copy(update={"path": str(resolved)})}
                )
    if errors:
        detail = "; ".join(f"{e['field']}: {e['msg']}" for e in errors)
        raise Unprocessable(detail, errors=errors, **extras)
    return spec


def _count_queued(session: Session, tenant_id: str | None = None) -> int:
    query = select(func.count()).select_from(Job).where(Job.status == JobStatus.queued)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return session.scalar(query) or 0


# pg_advisory_xact_lock(class, key) keyspace for per-tenant queue checks ("tque"); the two-key form never
# collides with the scheduler's one-key admission lock.
_TENANT_QUEUE_LOCK_CLASS = 0x74717565


def _lock_tenant_queue(session: Session, tenant_id: str) -> None:
    """Serialise count-then-queue for one tenant on PostgreSQL (SQLite: BEGIN IMMEDIATE already does)."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(tenant_id.encode()).digest()[:4], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(_TENANT_QUEUE_LOCK_CLASS, key)))


def _check_queue_room(session: Session, settings: Settings, tenant_id: str | None = None) -> None:
    if tenant_id is not None:
        _lock_tenant_queue(session, tenant_id)
        own = _count_queued(session, tenant_id)
        limit = settings.effective_tenant_max_queued_jobs
        if own >= limit:
            retry_after = max(1, math.ceil(settings.tick_seconds))
            raise QuotaExceeded(
                f"Your tenant already has {own} queued jobs (TENANT_MAX_QUEUED_JOBS={limit}); "
                f"retry in {retry_after} s or cancel a queued job.",
                retry_after=retry_after,
                queued_jobs=own,
                max_queued_jobs=limit,
            )
    queued = _count_queued(session)
    if queued >= settings.max_queued_jobs:
        retry_after = max(1, math.ceil(settings.tick_seconds))
        raise QuotaExceeded(
            f"{queued} jobs are already queued (MAX_QUEUED_JOBS={settings.max_queued_jobs}); "
            f"retry in {retry_after} s or cancel a queued job.",
            retry_after=retry_after,
            queued_jobs=queued,
            max_queued_jobs=settings.max_queued_jobs,
        )


def create(
    session: Session, *, request: JobCreate, settings: Settings, tenant_id: str | None, commit: bool = True
) -> Job:
    """Store a new job of `tenant_id` (pending, or queued when `auto_start`); 422 bad spec, 429 full queue.

    `commit=False` flushes only, so the caller can commit it together with an idempotency record.
    """
    spec = check_spec(session, spec=request.spec(), settings=settings, tenant_id=tenant_id)
    if request.auto_start:
        _check_queue_room(session, settings, tenant_id)
    now = utcnow()
    job = Job(
        spec=spec.model_dump(mode="json"),
        teacher_model_name=spec.teacher_model_name,
        status=JobStatus.pending,
        attempt=0,
        progress=0.0,
        created_at=now,
        updated_at=now,
        tenant_id=tenant_id,
    )
    session.add(job)
    session.flush()
    record_event(
        session, job_id=job.id, kind="state", message="created", data={"from": None, "to": "pending"}
    )
    if request.auto_start:
        job.status = JobStatus.queued
        job.queued_at = now
        record_state_change(session, job_id=job.id, old=JobStatus.pending, new=JobStatus.queued)
    if commit:
        session.commit()
    else:
        session.flush()
    return job


# ----------------------------------------------------------------------------------------------- read


def get(session: Session, *, job_id: str, tenant_id: str | None) -> Job | None:
    """The job, if it exists and belongs to `tenant_id` (None: any tenant, for internal callers)."""
    job = session.get(Job, job_id)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        return None
    return job


def get_or_raise(session: Session, *, job_id: str, tenant_id: str | None) -> Job:
    """The tenant's job, else NotFound (another tenant's job is reported exactly like a missing one)."""
    job = get(session, job_id=job_id, tenant_id=tenant_id)
    if job is None:
        raise NotFound(f"No job with id '{job_id}'.")
    return job


def read(session: Session, *, job_id: str, tenant_id: str | None) -> JobRead:
    """The tenant's job as a JobRead from one Core SELECT (no ORM instance): the API's most polled read."""
    table = Job.__table__
    row = session.execute(select(table).where(table.c.id == job_id)).first()
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"No job with id '{job_id}'.")
    return to_read(row)


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at_text, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(created_at_text)
        if not isinstance(job_id, str) or created_at.tzinfo is None:
            raise ValueError("bad cursor fields")
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise Unprocessable(
            "The cursor is not one this API issued; pass next_cursor from the previous page unchanged.",
            errors=[
                _field_error(["cursor"], "invalid cursor", "invalid_cursor") | {"loc": ["query", "cursor"]}
            ],
        ) from exc
    return created_at, job_id


def list_page(
    session: Session,
    *,
    limit: int,
    cursor: str | None = None,
    statuses: Iterable[str] = (),
    teacher: str | None = None,
    tenant_id: str | None,
) -> tuple[list[Job], bool, str | None]:
    """The tenant's jobs, newest first, keyset-paged on (created_at, id). Returns (jobs, has_more, cursor)."""
    query = select(Job)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    status_list = list(statuses)
    if status_list:
        query = query.where(Job.status.in_(status_list))
    if teacher:
        query = query.where(Job.teacher_model_name == teacher)
    if cursor:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
        )
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all())
    has_more = len(rows) > limit
    page = rows[:limit]
    return page, has_more, (_encode_cursor(page[-1]) if has_more and page else None)


# ----------------------------------------------------------------------------------------------- state


def _compare_and_set(session: Session, job: Job, expected: str, new: str, **values: Any) -> bool:
    """Move `job` from `expected` to `new` only if nobody changed its status meanwhile."""
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == expected)
        .values(status=new, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def start(
    session: Session, *, job_id: str, settings: Settings, tenant_id: str | None, commit: bool = True
) -> Job:
    """pending -> queued (queued_at now); 409 from any other state, 429 when the (tenant's) queue is full.

    `commit=False` flushes only, so the caller can commit it together with an idempotency record.
    """
    job = get_or_raise(session, job_id=job_id, tenant_id=tenant_id)
    if job.status != JobStatus.pending:
        raise Conflict(
            f"Job {job_id} is {job.status}; only a pending job can be started.", job_status=job.status
        )
    _check_queue_room(session, settings, job.tenant_id)
    if not _compare_and_set(session, job, JobStatus.pending, JobStatus.queued, queued_at=utcnow()):
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"Job {job_id} is {job.status}; only a pending job can be started.", job_status=job.status
        )
    record_state_change(
        session, job_id=job.id, old=JobStatus.pending, new=JobStatus.queued, attempt=job.attempt
    )
    if commit:
        session.commit()
    else:
        session.flush()
    session.refresh(job)
    return job


def cancel(session: Session, *, job_id: str, tenant_id: str | None) -> Job:
    """pending/queued -> cancelled at once; dispatched/running -> cancelling (the worker stops it).

    Cancelling again is a no-op; a finished job answers 409.
    """
    job = get_or_raise(session, job_id=job_id, tenant_id=tenant_id)
    for _ in range(_STATE_CHANGE_RETRIES):
        current = job.status
        if current == JobStatus.cancelling:
            return job
        if current in TERMINAL_STATUSES:
            raise Conflict(f"Job {job_id} already ended ({current}); nothing to cancel.", job_status=current)
        values: dict[str, Any] = {}
        if current in (JobStatus.pending, JobStatus.queued):
            target = JobStatus.cancelled
            values["finished_at"] = utcnow()
        else:
            target = JobStatus.cancelling
        if _compare_and_set(session, job, current, target, **values):
            record_state_change(
                session,
                job_id=job.id,
                old=current,
                new=target,
                attempt=job.attempt,
                reason="cancel requested",
            )
            session.commit()
            session.refresh(job)
            return job
        session.rollback()
        session.refresh(job)
    raise Conflict(f"Job {job_id} kept changing state; retry the cancel.", job_status=job.status)


def delete_job(session: Session, *, job_id: str, settings: Settings, tenant_id: str | None) -> None:
    """Remove a finished job: its row (events and artifacts cascade) and its directory under jobs_dir."""
    job = get_or_raise(session, job_id=job_id, tenant_id=tenant_id)
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(
            f"Job {job_id} is {job.status}; only a completed, failed or cancelled job can be deleted "
            "(cancel it first).",
            job_status=job.status,
        )
    result = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.status.in_(list(TERMINAL_STATUSES)))
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        session.rollback()
        raise Conflict(f"Job {job_id} changed state meanwhile; retry.")
    session.commit()
    session.expunge(job)
    job_dir = (settings.jobs_dir / job_id).resolve()
    if job_dir.parent == settings.jobs_dir.resolve() and job_dir.exists():
        shutil.rmtree(job_dir)


def wake_scheduler(settings: Settings) -> None:
    """Ask for admission right away (after a commit); a failure is logged, the scheduler's tick retries."""
    from app.services import scheduler

    try:
        scheduler.admit_and_dispatch(settings)
    except NotImplementedError:
        logger.info("admission is not implemented yet; the job stays queued")
    except Exception:
        logger.exception("admission after start failed; the scheduler's next tick retries")


# ----------------------------------------------------------------------------------------------- views


def _error(job: Job | Row[Any]) -> JobError | None:
    if not job.error:
        return None
    return JobError.model_validate(
        {"code": str(job.error.get("code", "error")), "message": str(job.error.get("message", ""))}
        | {k: v for k, v in job.error.items() if k not in ("code", "message")}
    )


def to_read(job: Job | Row[Any]) -> JobRead:
    """The API view of a job (an ORM instance, or a row of the jobs table: same attribute names)."""
    estimated = None
    if job.status == JobStatus.running and job.eta_seconds is not None:
        estimated = utcnow() + timedelta(seconds=max(0.0, job.eta_seconds))
    return JobRead(
        job_id=job.id,
        status=job.status,
        progress=min(100.0, max(0.0, job.progress or 0.0)),
        phase=job.phase,
        estimated_completion=estimated,
        eta_seconds=job.eta_seconds,
        created_at=job.created_at,
        updated_at=job.updated_at,
        queued_at=job.queued_at,
        dispatched_at=job.dispatched_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
        attempt=job.attempt,
        teacher_model_name=job.teacher_model_name,
        spec=job.spec,
        metrics=job.metrics,
        results=job.results,
        error=_error(job),
    )


def to_summary(job: Job) -> JobSummary:
    spec = job.spec or {}
    return JobSummary(
        job_id=job.id,
        status=job.status,
        progress=min(100.0, max(0.0, job.progress or 0.0)),
        phase=job.phase,
        teacher_model_name=job.teacher_model_name,
        target_compression=spec.get("target_compression"),
        distillation_method=spec.get("distillation_method"),
        task=spec.get("task"),
        attempt=job.attempt,
        created_at=job.created_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=_error(job),
    )
