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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from psycopg.types.json import Json
from sqlalchemy import ARRAY, Select, String, and_, any_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from app.core.batching import KeyedBatcher
from app.core.config import Settings, get_settings
from app.core.db import AsyncDb, compile_for_psycopg_with_constants
from app.errors import Conflict, NotFound, QuotaExceeded, Unprocessable
from app.models import TERMINAL_STATUSES, Job, JobStatus, ServiceHeartbeat, Teacher, new_id, utcnow
from app.schemas.job_spec import BuiltinSource, DerivedStudent, HubSource, JobSpec, Task, UploadedDataset
from app.schemas.jobs import JobCreate, JobError, JobLineage, JobRead, JobSummary
from app.schemas.page import Page
from app.schemas.teachers_api import IMAGE_TEACHER_TYPE
from app.services import checkpoints as checkpoints_service
from app.services import datasets as datasets_service
from app.services import estimates as estimates_service
from app.services import file_roots, heartbeats, job_checks
from app.services import teachers as teachers_service
from app.services.events import record_event, record_state_change

logger = logging.getLogger("distillery.jobs")

_LABELLED_TASKS = (Task.classification, Task.sequence_classification, Task.image_classification)
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
    image_teacher = teacher.type == IMAGE_TEACHER_TYPE
    # A .pt2 program may be an image classifier too (the job's preprocessing says how to feed it).
    image_capable = image_teacher or teacher.type == "program"
    if (task == Task.image_classification and not image_capable) or (
        image_teacher and task != Task.image_classification
    ):
        if image_teacher:
            use: Task | None = Task.image_classification
            advice = f"use task '{use}'"
        else:
            use = default or text_task or Task.classification
            advice = f"use task '{use}', or register an image classifier with type '{IMAGE_TEACHER_TYPE}'"
        return (
            f"Teacher '{teacher.name}' is a {teacher.source_kind} {teacher.type} model; task '{task}' needs "
            f"an image classifier (type '{IMAGE_TEACHER_TYPE}': a transformers image model or a .pt2 "
            f"program): {advice}",
            str(use),
        )
    if image_teacher or task == Task.image_classification:
        return None
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


def _cap_errors(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    """The spec's violations of the settings' caps (MAX_EPOCHS, MAX_BATCH_SIZE): no database needed."""
    errors: list[dict[str, Any]] = []
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
    return errors


def check_spec(session: Session, *, spec: JobSpec, settings: Settings, tenant_id: str | None) -> JobSpec:
    """Checks that need the database or settings: teacher, dataset, caps. Returns the spec to store.

    Only the tenant's own teachers and datasets (and the global seeded teachers) can be named.

    A `file` dataset's path is stored resolved (symlinks followed) and relative to the tenant's file root, so
    the worker reads the file checked here and no response shows a server path.
    """
    errors = _cap_errors(spec, settings)
    extras: dict[str, Any] = {}
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
    spec, path_errors = file_roots.check_spec_sources(
        session, spec=spec, settings=settings, tenant_id=tenant_id
    )
    errors += path_errors
    if not errors:  # what the client brings (student, held-out sets, tables, programs): issue 9
        spec = job_checks.check_brought(
            session, spec=spec, settings=settings, tenant_id=tenant_id, errors=errors
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
    parent = (
        checkpoints_service.resolve_parent(
            session, source=request.from_checkpoint, spec=spec, tenant_id=tenant_id
        )
        if request.from_checkpoint is not None
        else None
    )
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
        name=request.name,
        job_metadata=dict(request.metadata),
        estimate=estimates_service.estimate(
            session,
            spec=spec,
            tenant_id=tenant_id,
            settings=settings,
            start_epoch=parent.epoch if parent else 0,
        ),
        parent_job_id=parent.job_id if parent else None,
        parent_checkpoint=parent.name if parent else None,
    )
    session.add(job)
    session.flush()
    if parent is not None:
        checkpoints_service.copy_parent_weights(parent, job_id=job.id, settings=settings)
    record_event(
        session, job_id=job.id, kind="state", message="created", data={"from": None, "to": "pending"}
    )
    if request.auto_start:
        job.status = JobStatus.queued
        job.queued_at = now
        record_state_change(session, job_id=job.id, old=JobStatus.pending, new=JobStatus.queued)
        _note_capacity_wait(session, job, settings)
    if commit:
        session.commit()
    else:
        session.flush()
    return job


# A pending job and its `created` state event in one statement (autocommit: atomic on its own), inserted
# only if the teacher the tenant sees by that name (its own, else the global one, as `teachers.get`) fits
# the task: the create's checks and writes in one round trip instead of five (BEGIN, teacher SELECT, two
# INSERTs, COMMIT).
_CREATE_PENDING_SQL = f"""
WITH teacher AS (
    SELECT teachers.type, teachers.source_kind, teachers.params FROM teachers
    WHERE teachers.name = %(teacher)s::varchar
      AND (teachers.tenant_id IS NULL OR teachers.tenant_id = %(tenant_id)s::varchar)
    ORDER BY teachers.tenant_id IS NULL
    LIMIT 1
), job AS (
    INSERT INTO jobs (id, spec, teacher_model_name, status, attempt, progress, created_at, updated_at,
                      tenant_id, name, job_metadata, pause_count, estimate)
    SELECT %(id)s::varchar, %(spec)s::json, %(teacher)s::varchar, %(status)s::varchar, 0, 0.0,
           %(now)s::timestamptz, %(now)s::timestamptz, %(tenant_id)s::varchar, %(name)s::varchar,
           %(job_metadata)s::json, 0, %(estimate)s::json
    WHERE EXISTS (
        SELECT 1 FROM teacher
        -- `_teacher_task_mismatch` in SQL: any mismatch falls back to `create`, which explains it.
        WHERE CASE WHEN %(image)s::boolean THEN teacher.type = ANY(%(image_types)s::varchar[])
                   WHEN %(classification)s::boolean
                   THEN NOT (teacher.type = ANY(%(text_types)s::varchar[])) AND teacher.source_kind <> 'hub'
                        AND teacher.type <> %(image_type)s::varchar
                   ELSE teacher.type = ANY(%(text_types)s::varchar[]) AND teacher.source_kind <> 'builtin'
              END
    )
    RETURNING *
), created AS (
    INSERT INTO job_events (job_id, created_at, kind, attempt, message, data)
    SELECT job.id, %(now)s::timestamptz, 'state', 0, 'created', %(event)s::json FROM job
)
SELECT job.*,
       -- What the estimate is made from, as of this statement: checks the one it stored.
       (SELECT teacher.params FROM teacher) AS est_teacher_params,
       {estimates_service.ANY_GPU_WORKER_SQL} AS est_any_gpu_worker,
       ({estimates_service.HISTORY_VERSION_SQL}) AS est_history_version
FROM job
"""
_SET_ESTIMATE_SQL = "UPDATE jobs SET estimate = %(estimate)s::json WHERE id = %(id)s::varchar RETURNING *"


@dataclass(frozen=True)
class _EstimateInputs:
    """What a create's estimate is made from (besides the spec), as its statement read them."""

    teacher_params: int | None
    any_gpu_worker: bool
    history_version: datetime | None


def creates_in_one_statement(request: JobCreate, settings: Settings) -> bool:
    """Whether `create_pending_async` can create this job with nothing of `check_spec` left unchecked.

    Left pending (no queue checks and locks); a derived student; data that needs no lookup or path check
    (builtin or hub, held-out splits too: no upload, no server file); within the caps. The teacher's
    visibility and task fit are checked in the statement itself. Anything else takes `create`.
    """
    dataset = request.dataset_config
    sources = [dataset, dataset.validation, dataset.test]
    return (
        not request.auto_start
        and request.from_checkpoint is None  # the parent's checks and the copy of its weights
        and all(source is None or isinstance(source, BuiltinSource | HubSource) for source in sources)
        and isinstance(request.student, DerivedStudent)
        and not _cap_errors(request, settings)
    )


async def create_pending_async(
    db: AsyncDb, *, request: JobCreate, tenant_id: str, settings: Settings
) -> JobRead | None:
    """Store a pending job (the common create) in one statement on the event loop, estimate included; its
    API view.

    For requests `creates_in_one_statement` accepts. None when the teacher is not visible to the tenant:
    the caller then runs `create`, whose full check answers the 422 with the valid names. The estimate is
    made beforehand from what the previous create of this teacher read (the registered teacher size,
    whether a worker has GPUs, the history's version); the statement reads them again as it inserts, and
    when they changed (or on the first create) the estimate is made again from those and stored by a
    second statement. So the stored estimate is always the one the state at insert time gives.
    """
    spec = request.spec()
    seen: dict[tuple[str, str], _EstimateInputs] = db.memo.setdefault("jobs.estimate_inputs", {})
    key = (tenant_id, spec.teacher_model_name)
    guess = seen.get(key)
    spec_json = json.dumps(spec.model_dump(mode="json"))
    estimate = None if guess is None else await _estimate_async(db, spec, spec_json, guess, settings)
    params = {
        "id": new_id(),
        "spec": spec_json,
        "teacher": spec.teacher_model_name,
        "status": JobStatus.pending.value,
        "now": utcnow(),
        "tenant_id": tenant_id,
        "name": request.name,
        "job_metadata": Json(dict(request.metadata)),
        "event": Json({"from": None, "to": JobStatus.pending.value}),
        "classification": spec.task == Task.classification,
        "text_types": sorted(_TEXT_TEACHER_TASKS),
        "image": spec.task == Task.image_classification,
        "image_type": IMAGE_TEACHER_TYPE,
        "image_types": [IMAGE_TEACHER_TYPE, "program"],
        "estimate": estimate,
    }
    row = await db.fetch_one(_CREATE_PENDING_SQL, params, retry=False)
    if row is None:
        return None
    inputs = _EstimateInputs(row.est_teacher_params, bool(row.est_any_gpu_worker), row.est_history_version)
    if len(seen) >= _ESTIMATE_INPUTS_KEPT and key not in seen:
        seen.clear()
    seen[key] = inputs
    if inputs != guess:
        try:
            estimate = await _estimate_async(db, spec, spec_json, inputs, settings)
            row = await db.fetch_one(_SET_ESTIMATE_SQL, {"id": row.id, "estimate": estimate}) or row
        except Exception:  # the job stands without it; `start` makes it
            logger.exception("could not store the estimate of job %s", row.id)
    return to_read(row)


# (tenant, teacher) pairs whose estimate inputs a pool remembers; past it, it starts again.
_ESTIMATE_INPUTS_KEPT = 4096


async def _estimate_async(
    db: AsyncDb, spec: JobSpec, spec_json: str, inputs: _EstimateInputs, settings: Settings
) -> str:
    """`estimates.estimate` from `inputs`, as JSON: the history of finished jobs is kept per version, and
    the estimate of the same spec from the same inputs is made once (clients repeat their jobs)."""
    made: dict[tuple[_EstimateInputs, str], str] = db.memo.setdefault("jobs.estimates", {})
    found = made.get((inputs, spec_json))
    if found is not None:
        return found
    history: list[dict[str, Any]] = []
    if inputs.history_version is not None:
        kept = db.memo.get("estimates.history")
        if kept is not None and kept[0] == inputs.history_version:
            history = kept[1]
        else:
            rows = await db.fetch_all(estimates_service.HISTORY_SQL, {})
            history = estimates_service.usable_history(r.estimate for r in rows)
            db.memo["estimates.history"] = (inputs.history_version, history)
    estimate = estimates_service.compute(
        spec,
        history=history,
        registered_teacher_params=inputs.teacher_params,
        dataset_rows=estimates_service.dataset_rows_without_lookup(spec),
        device=estimates_service.device_for(spec, any_gpu_worker=inputs.any_gpu_worker),
        settings=settings,
    )
    if len(made) >= _ESTIMATES_KEPT:
        made.clear()
    made[(inputs, spec_json)] = found = json.dumps(estimate)
    return found


# Estimates a pool keeps made (by inputs and spec); past it, it starts again.
_ESTIMATES_KEPT = 1024


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


# Built once: the polled read pays neither statement construction nor a cache-key walk of a new object.
# A queued job's read also says the most devices a live worker offers (for `queue_reason`); other states
# skip that subquery (CASE), so the polled read of a running job costs what it did.
_LIVE_DEVICES = (
    select(func.coalesce(func.max(heartbeats.offered_devices()), 0))
    .where(ServiceHeartbeat.kind == "worker", ServiceHeartbeat.last_seen_at >= bindparam("live_since"))
    .scalar_subquery()
)
_READ_JOB = select(
    Job.__table__,
    case((Job.__table__.c.status == JobStatus.queued.value, _LIVE_DEVICES), else_=None).label("live_devices"),
).where(Job.__table__.c.id == bindparam("job_id"))
_READ_JOB_SQL, _READ_JOB_CONSTANTS = compile_for_psycopg_with_constants(_READ_JOB)


def _read_params(job_id: str) -> dict[str, Any]:
    since = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout)
    return {"job_id": job_id, "live_since": since}


def _read_row(row: Row[Any] | None, *, job_id: str, tenant_id: str | None) -> JobRead:
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"No job with id '{job_id}'.")
    return to_read(row)


def read(session: Session, *, job_id: str, tenant_id: str | None) -> JobRead:
    """The tenant's job as a JobRead from one Core SELECT (no ORM instance): the API's most polled read."""
    row = session.execute(_READ_JOB, _read_params(job_id)).first()
    return _read_row(row, job_id=job_id, tenant_id=tenant_id)


# The same read for several jobs at once: concurrent polls share one statement (`KeyedBatcher`).
_READ_JOBS = select(
    Job.__table__,
    case((Job.__table__.c.status == JobStatus.queued.value, _LIVE_DEVICES), else_=None).label("live_devices"),
).where(Job.__table__.c.id == any_(bindparam("job_ids", type_=ARRAY(String))))
_READ_JOBS_SQL, _READ_JOBS_CONSTANTS = compile_for_psycopg_with_constants(_READ_JOBS)


async def _fetch_jobs(db: AsyncDb, job_ids: Sequence[str]) -> dict[str, Any]:
    since = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout)
    params = _READ_JOBS_CONSTANTS | {"job_ids": list(job_ids), "live_since": since}
    return {row.id: row for row in await db.fetch_all(_READ_JOBS_SQL, params)}


def read_batcher(db: AsyncDb) -> KeyedBatcher[str, Any]:
    """The pool's coalescing reader of job rows (by id)."""
    return db.batcher("jobs.read", lambda ids: _fetch_jobs(db, ids))


async def read_async(db: AsyncDb, *, job_id: str, tenant_id: str | None) -> JobRead:
    """`read` on the event loop, through the async read pool (autocommit, no thread hop). Concurrent reads
    are coalesced: while a statement is out, the jobs asked for meanwhile are read by the next one, together
    (each still read after its request arrived; see app.core.batching)."""
    row = await read_batcher(db).get(job_id)
    return _read_row(row, job_id=job_id, tenant_id=tenant_id)


def _encode_cursor(job: Any) -> str:
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


# What a list page shows, and no more: the spec's three summary fields are extracted by the database, so a
# page never loads (or decodes) the specs, metrics and results of its 50 jobs.
_SUMMARY_COLUMNS = (
    Job.id,
    Job.status,
    Job.progress,
    Job.phase,
    Job.teacher_model_name,
    Job.spec["target_compression"].as_float().label("target_compression"),
    Job.spec["distillation_method"].as_string().label("distillation_method"),
    Job.spec["task"].as_string().label("task"),
    Job.attempt,
    Job.created_at,
    Job.queued_at,
    Job.started_at,
    Job.finished_at,
    Job.error,
    Job.name,
    Job.job_metadata,
)


@dataclass(frozen=True)
class _ListShape:
    """Which filters a list query has: each shape is one statement, built (and compiled) once."""

    tenant: bool
    statuses: bool
    teacher: bool
    cursor: bool
    name: bool = False
    metadata_keys: tuple[str, ...] = ()  # each filtered key (its value is bound as `meta_<i>`)


@lru_cache(maxsize=64)
def _list_statement(shape: _ListShape, *, status_any: bool) -> Select[Any]:
    """The list query of `shape` with bind parameters; `status_any`: `status = ANY(array)` (one bind,
    for the psycopg text) instead of an expanding IN (SQLAlchemy's execution)."""
    query = select(*_SUMMARY_COLUMNS)
    if shape.tenant:
        query = query.where(Job.tenant_id == bindparam("tenant_id"))
    if shape.statuses:
        if status_any:
            query = query.where(Job.status == func.any(bindparam("statuses")))
        else:
            query = query.where(Job.status.in_(bindparam("statuses", expanding=True)))
    if shape.teacher:
        query = query.where(Job.teacher_model_name == bindparam("teacher"))
    if shape.name:
        query = query.where(Job.name == bindparam("name"))
    for index, key in enumerate(shape.metadata_keys):
        query = query.where(Job.job_metadata[key].as_string() == bindparam(f"meta_{index}"))
    if shape.cursor:
        after_at = bindparam("after_at", type_=Job.__table__.c.created_at.type)
        query = query.where(
            or_(Job.created_at < after_at, and_(Job.created_at == after_at, Job.id < bindparam("after_id")))
        )
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(bindparam("limit"))


@lru_cache(maxsize=64)
def _list_sql(shape: _ListShape) -> tuple[str, dict[str, Any]]:
    """`_list_statement` as psycopg text, and the values of its constant binds (the spec's JSON keys)."""
    return compile_for_psycopg_with_constants(_list_statement(shape, status_any=True))


def _list_query(
    *,
    limit: int,
    cursor: str | None,
    statuses: Iterable[str],
    teacher: str | None,
    tenant_id: str | None,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[_ListShape, dict[str, Any]]:
    status_list = list(statuses)
    params: dict[str, Any] = {"limit": limit + 1, "tenant_id": tenant_id, "statuses": status_list}
    params["teacher"] = teacher
    params["name"] = name
    keys = tuple(sorted(metadata or {}))
    for index, key in enumerate(keys):
        params[f"meta_{index}"] = (metadata or {})[key]
    if cursor:
        params["after_at"], params["after_id"] = _decode_cursor(cursor)
    shape = _ListShape(
        tenant=tenant_id is not None,
        statuses=bool(status_list),
        teacher=bool(teacher),
        cursor=bool(cursor),
        name=name is not None,
        metadata_keys=keys,
    )
    return shape, params


def _page_of(rows: list[Any], limit: int) -> tuple[list[Any], bool, str | None]:
    has_more = len(rows) > limit
    page = rows[:limit]
    return page, has_more, (_encode_cursor(page[-1]) if has_more and page else None)


def list_page(
    session: Session,
    *,
    limit: int,
    cursor: str | None = None,
    statuses: Iterable[str] = (),
    teacher: str | None = None,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
    tenant_id: str | None,
) -> tuple[list[Row[Any]], bool, str | None]:
    """The tenant's jobs, newest first, keyset-paged on (created_at, id). Returns (rows, has_more, cursor).

    Rows carry the summary columns (`to_summary` turns one into a JobSummary). With the tenant's
    (tenant_id, created_at, id) indexes (and their status and teacher variants, migration 0005) a page
    reads its rows in index order from the cursor on: its cost does not grow with the tenant's job count.
    `name` and every `metadata` pair must match exactly (JSON ->> on PostgreSQL, json_extract on SQLite).
    """
    shape, params = _list_query(
        limit=limit,
        cursor=cursor,
        statuses=statuses,
        teacher=teacher,
        name=name,
        metadata=metadata,
        tenant_id=tenant_id,
    )
    rows = list(session.execute(_list_statement(shape, status_any=False), params).all())
    return _page_of(rows, limit)


async def list_page_async(
    db: AsyncDb,
    *,
    limit: int,
    cursor: str | None = None,
    statuses: Iterable[str] = (),
    teacher: str | None = None,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
    tenant_id: str,
) -> tuple[list[Any], bool, str | None]:
    """`list_page` on the event loop through the async pool: the same statement, compiled once per shape."""
    shape, params = _list_query(
        limit=limit,
        cursor=cursor,
        statuses=statuses,
        teacher=teacher,
        name=name,
        metadata=metadata,
        tenant_id=tenant_id,
    )
    sql, constants = _list_sql(shape)
    rows = await db.fetch_all(sql, constants | params)
    return _page_of(rows, limit)


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
    values: dict[str, Any] = {"queued_at": utcnow()}
    if job.estimate is None:  # a create whose estimate could not be stored (see create_pending_async)
        values["estimate"] = estimates_service.estimate(
            session, spec=JobSpec.model_validate(job.spec), tenant_id=job.tenant_id, settings=settings
        )
    if not _compare_and_set(session, job, JobStatus.pending, JobStatus.queued, **values):
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"Job {job_id} is {job.status}; only a pending job can be started.", job_status=job.status
        )
    record_state_change(
        session, job_id=job.id, old=JobStatus.pending, new=JobStatus.queued, attempt=job.attempt
    )
    _note_capacity_wait(session, job, settings)
    if commit:
        session.commit()
    else:
        session.flush()
    session.refresh(job)
    return job


def cancel(session: Session, *, job_id: str, tenant_id: str | None) -> Job:
    """pending/queued/paused -> cancelled at once; dispatched/running/pausing -> cancelling (the worker
    stops it).

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
        if current in (JobStatus.pending, JobStatus.queued, JobStatus.paused):
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


def pause(session: Session, *, job_id: str, tenant_id: str | None, commit: bool = True) -> Job:
    """queued/dispatched -> paused at once; running -> pausing (the worker stops at its next check, keeps
    its checkpoint and frees the slot: -> paused). Pausing again is a no-op; other states answer 409.

    A dispatched job's message is dropped by the worker's claim (it claims only `dispatched` jobs).
    `commit=False` flushes only, so the caller can commit it together with an idempotency record.
    """
    job = get_or_raise(session, job_id=job_id, tenant_id=tenant_id)
    for _ in range(_STATE_CHANGE_RETRIES):
        current = job.status
        if current in (JobStatus.pausing, JobStatus.paused):
            return job
        values: dict[str, Any] = {}
        if current in (JobStatus.queued, JobStatus.dispatched):
            target = JobStatus.paused
            values["dispatched_at"] = None
        elif current == JobStatus.running:
            target = JobStatus.pausing
        else:
            hint = {
                JobStatus.pending: "it is not queued yet (start it, or leave it pending)",
                JobStatus.cancelling: "it is being cancelled",
            }.get(JobStatus(current), "it already ended")
            raise Conflict(
                f"Job {job_id} is {current}; only a queued or running job can be paused: {hint}.",
                job_status=current,
            )
        if _compare_and_set(session, job, current, target, **values):
            record_state_change(
                session, job_id=job.id, old=current, new=target, attempt=job.attempt, reason="pause requested"
            )
            if commit:
                session.commit()
            else:
                session.flush()
            session.refresh(job)
            return job
        # Someone changed it first (e.g. the scheduler dispatched it): read it again and decide anew. With
        # commit=False the caller's pending work (an idempotency record) stays: no rollback, a re-read
        # (PostgreSQL: READ COMMITTED sees the other commit; SQLite: BEGIN IMMEDIATE allows no other writer).
        if commit:
            session.rollback()
        session.refresh(job)
    raise Conflict(f"Job {job_id} kept changing state; retry the pause.", job_status=job.status)


def resume(
    session: Session, *, job_id: str, settings: Settings, tenant_id: str | None, commit: bool = True
) -> Job:
    """paused -> queued (queued_at now: it waits behind the jobs queued while it rested); the run resumes
    from its checkpoint on whichever worker claims it. 409 while still pausing or in any other state, 429
    when the (tenant's) queue is full."""
    job = get_or_raise(session, job_id=job_id, tenant_id=tenant_id)
    if job.status != JobStatus.paused:
        hint = (
            "its worker is still stopping; retry once it is paused"
            if job.status == JobStatus.pausing
            else "only a paused job can be resumed"
        )
        raise Conflict(f"Job {job_id} is {job.status}; {hint}.", job_status=job.status)
    _check_queue_room(session, settings, job.tenant_id)
    if not _compare_and_set(session, job, JobStatus.paused, JobStatus.queued, queued_at=utcnow()):
        if commit:
            session.rollback()
        session.refresh(job)
        raise Conflict(
            f"Job {job_id} is {job.status}; only a paused job can be resumed.", job_status=job.status
        )
    record_state_change(
        session,
        job_id=job.id,
        old=JobStatus.paused,
        new=JobStatus.queued,
        attempt=job.attempt,
        reason="resume requested",
    )
    if commit:
        session.commit()
    else:
        session.flush()
    session.refresh(job)
    return job


_DELETABLE_STATUSES = (*TERMINAL_STATUSES, JobStatus.paused)


def delete_job(session: Session, *, job_id: str, settings: Settings, tenant_id: str | None) -> None:
    """Remove a finished or paused job: its row (events, artifacts and checkpoints cascade) and its
    directory under jobs_dir."""
    job = get_or_raise(session, job_id=job_id, tenant_id=tenant_id)
    if job.status not in _DELETABLE_STATUSES:
        raise Conflict(
            f"Job {job_id} is {job.status}; only a completed, failed, cancelled or paused job can be "
            "deleted (cancel or pause it first).",
            job_status=job.status,
        )
    result = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.status.in_(list(_DELETABLE_STATUSES)))
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


def _note_capacity_wait(session: Session, job: Job, settings: Settings) -> None:
    """A just-queued job larger than every live worker gets a `queue` event saying why it waits."""
    from app.services import scheduler

    session.flush()
    scheduler.note_capacity_wait(session, job=job, settings=settings)


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


def _error_fields(job: Any) -> dict[str, Any] | None:
    """A stored error as the API shows it: code and message as strings, its other fields kept."""
    if not job.error:
        return None
    return {"code": str(job.error.get("code", "error")), "message": str(job.error.get("message", ""))} | {
        k: v for k, v in job.error.items() if k not in ("code", "message")
    }


def _error(job: Job | Row[Any]) -> JobError | None:
    fields = _error_fields(job)
    return None if fields is None else JobError.model_validate(fields)


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
        queue_reason=_queue_reason(job),
        name=job.name,
        metadata=job.job_metadata or {},
        estimate=job.estimate,
        parent=(
            JobLineage(job_id=job.parent_job_id, checkpoint=job.parent_checkpoint or "")
            if job.parent_job_id
            else None
        ),
    )


def _queue_reason(job: Job | Row[Any]) -> str | None:
    """Why a queued job is not admitted yet, when it is larger than every live worker (reads only)."""
    if job.status != JobStatus.queued:
        return None
    from app.services.scheduler import capacity_wait_reason

    world_size = int(((job.spec or {}).get("training_config") or {}).get("world_size") or 1)
    return capacity_wait_reason(world_size, getattr(job, "live_devices", None))


def summary_page(jobs: Iterable[Any], *, has_more: bool, next_cursor: str | None) -> Page[JobSummary]:
    """A list page: every summary validated in one call (not one model construction per job)."""
    return Page[JobSummary].model_validate(
        {"data": [_summary_fields(j) for j in jobs], "has_more": has_more, "next_cursor": next_cursor}
    )


def to_summary(job: Any) -> JobSummary:
    """A job in a list: from a `list_page` row (the spec's fields extracted in SQL) or an ORM instance."""
    return JobSummary.model_validate(_summary_fields(job))


def _summary_fields(job: Any) -> dict[str, Any]:
    if isinstance(job, Job):
        spec = job.spec or {}
        target_compression = spec.get("target_compression")
        distillation_method = spec.get("distillation_method")
        task = spec.get("task")
    else:
        target_compression, distillation_method, task = (
            job.target_compression,
            job.distillation_method,
            job.task,
        )
    return {
        "job_id": job.id,
        "status": job.status,
        "progress": min(100.0, max(0.0, job.progress or 0.0)),
        "phase": job.phase,
        "teacher_model_name": job.teacher_model_name,
        "target_compression": target_compression,
        "distillation_method": distillation_method,
        "task": task,
        "attempt": job.attempt,
        "created_at": job.created_at,
        "queued_at": job.queued_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": _error_fields(job),
        "name": job.name,
        "metadata": job.job_metadata or {},
    }
