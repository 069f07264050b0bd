"""The jobs resource: create, start, read, list, cancel, delete, events and artifacts. Thin: services work."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import (
    AsyncDbDep,
    CurrentTenantDep,
    SessionDep,
    SettingsDep,
    WakeSchedulerDep,
)
from app.core.config import Settings
from app.core.db import begin_autocommit_read, get_sessionmaker
from app.models import JobStatus
from app.schemas.jobs import DIGITS_JOB_EXAMPLE, ArtifactRead, JobCreate, JobEventRead, JobRead, JobSummary
from app.schemas.page import Page
from app.schemas.problem import problem_responses
from app.services import artifacts as artifacts_service
from app.services import event_stream, idempotency, job_ids
from app.services import events as events_service
from app.services import jobs as jobs_service
from app.services.auth import Principal

router = APIRouter(prefix="/distillation/jobs", tags=["jobs"])

JobId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="The job's id, or any unique prefix of it (at least 4 characters; ambiguous: 409)",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        min_length=1,
        max_length=idempotency.MAX_KEY_LENGTH,
        description="Repeat the request safely: the same key and body within 24 h replay the first "
        "response (with `Idempotent-Replayed: true`); the same key with another body answers 422.",
    ),
]
_REPLAY_HEADER_DOC = {
    idempotency.REPLAYED_HEADER: {
        "description": "`true` when this is the stored response to an earlier request with the same key",
        "schema": {"type": "string"},
    }
}


def _replay(stored: idempotency.StoredResponse) -> JSONResponse:
    """The stored first response to a request with this Idempotency-Key, marked as a replay."""
    headers = stored.headers | {idempotency.REPLAYED_HEADER: "true"}
    return JSONResponse(stored.body, status_code=stored.status_code, headers=headers)


_CREATE_EXAMPLES: dict[str, Any] = {
    "digits": {
        "summary": "A whole digits job, started at once",
        "value": DIGITS_JOB_EXAMPLE,
    },
    "progressive": {
        "summary": "Progressive distillation in 3 stages, left pending",
        "value": {
            "teacher_model_name": "digits-cnn",
            "target_compression": 0.1,
            "distillation_method": "progressive_distillation",
            "training_config": {"epochs": 5, "num_stages": 3, "temperature": 3.0, "alpha": 0.9},
            "dataset_config": {"kind": "builtin", "name": "digits"},
        },
    },
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRead,
    summary="Create a distillation job",
    description="Validates the spec (every bound, the teacher and dataset exist), stores the job as "
    "`pending`, or `queued` with `auto_start: true`.",
    responses={
        **problem_responses(401, 422, 429, 503),
        201: {"description": "The job", "headers": _REPLAY_HEADER_DOC},
    },
)
async def create_job(
    settings: SettingsDep,
    tenant: CurrentTenantDep,
    wake: WakeSchedulerDep,
    db: AsyncDbDep,
    background: BackgroundTasks,
    response: Response,
    request: Annotated[JobCreate, Body(openapi_examples=_CREATE_EXAMPLES)],
    idempotency_key: IdempotencyKey = None,
) -> Any:
    # The common create (pending, a dataset needing no lookup, no Idempotency-Key) is one statement on the
    # event loop (PostgreSQL). Everything else, and an unknown teacher's 422, takes one worker-thread hop
    # for the full checks and the transaction; the response is validated on the event loop.
    if (
        db is not None
        and idempotency_key is None
        and jobs_service.creates_in_one_statement(request, settings)
    ):
        read = await jobs_service.create_pending_async(db, request=request, tenant_id=tenant.tenant_id)
        if read is not None:
            response.headers["Location"] = f"/distillation/jobs/{read.job_id}"
            return read
    return await run_in_threadpool(
        _create_job, settings, tenant, wake, background, response, request, idempotency_key
    )


def _create_job(
    settings: Settings,
    tenant: Principal,
    wake: bool,
    background: BackgroundTasks,
    response: Response,
    request: JobCreate,
    idempotency_key: str | None,
) -> Any:
    # Its own session, opened in the thread: the one-statement path above needs none.
    with get_sessionmaker()() as session:
        return _create_job_in_session(
            session, settings, tenant, wake, background, response, request, idempotency_key
        )


def _create_job_in_session(
    session: Session,
    settings: Settings,
    tenant: Principal,
    wake: bool,
    background: BackgroundTasks,
    response: Response,
    request: JobCreate,
    idempotency_key: str | None,
) -> Any:
    record = None
    if idempotency_key is not None:
        body = request.model_dump(mode="json", exclude_unset=True)
        found = idempotency.begin(
            session,
            tenant_id=tenant.tenant_id,
            key=idempotency_key,
            fingerprint=idempotency.request_hash("POST", "/distillation/jobs", body),
            ttl_hours=settings.idempotency_ttl_hours,
        )
        if isinstance(found, idempotency.StoredResponse):
            return _replay(found)
        record = found
    job = jobs_service.create(
        session, request=request, settings=settings, tenant_id=tenant.tenant_id, commit=record is None
    )
    read = jobs_service.to_read(job)
    response.headers["Location"] = f"/distillation/jobs/{job.id}"
    if record is not None:
        idempotency.finish(
            session,
            record,
            status_code=status.HTTP_201_CREATED,
            body=read.model_dump(mode="json"),
            headers=dict(response.headers),
        )
    if job.status == JobStatus.queued and wake:
        background.add_task(jobs_service.wake_scheduler, settings)
    return read


@router.post(
    "/{job_id}/start",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    summary="Queue a pending job",
    description="pending -> queued. The scheduler admits queued jobs in queued_at order while fewer than "
    "MAX_CONCURRENT_JOBS run. 429 with Retry-After when MAX_QUEUED_JOBS are already waiting.",
    responses={
        **problem_responses(401, 404, 422, 409, 429, 503),
        202: {"description": "The queued job", "headers": _REPLAY_HEADER_DOC},
    },
)
def start_job(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
    wake: WakeSchedulerDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant.tenant_id)
    record = None
    if idempotency_key is not None:
        found = idempotency.begin(
            session,
            tenant_id=tenant.tenant_id,
            key=idempotency_key,
            fingerprint=idempotency.request_hash("POST", f"/distillation/jobs/{job_id}/start", None),
            ttl_hours=settings.idempotency_ttl_hours,
        )
        if isinstance(found, idempotency.StoredResponse):
            return _replay(found)
        record = found
    job = jobs_service.start(
        session, job_id=job_id, settings=settings, tenant_id=tenant.tenant_id, commit=record is None
    )
    if record is not None:
        read = jobs_service.to_read(job)
        idempotency.finish(
            session,
            record,
            status_code=status.HTTP_202_ACCEPTED,
            body=read.model_dump(mode="json"),
            headers={},
        )
        if wake:
            background.add_task(jobs_service.wake_scheduler, settings)
        return read
    if wake:
        background.add_task(jobs_service.wake_scheduler, settings)
    return jobs_service.to_read(job)


@router.get(
    "/{job_id}",
    response_model=JobRead,
    summary="A job's status, progress, ETA, metrics and results",
    responses=problem_responses(401, 404, 409, 422, 503),
)
async def get_job(job_id: JobId, tenant: CurrentTenantDep, db: AsyncDbDep) -> JobRead:
    # The hot polling path: on PostgreSQL one SELECT on the event loop (async read pool, no thread hop, no
    # request session); on SQLite one worker-thread hop for the query.
    if db is not None and job_ids.is_full(job_id):
        return await jobs_service.read_async(db, job_id=job_id, tenant_id=tenant.tenant_id)
    return await run_in_threadpool(_read_job, job_id, tenant.tenant_id)


def _read_job(job_id: str, tenant_id: str) -> JobRead:
    with get_sessionmaker()() as session:  # closed here, in the thread, not on the event loop
        begin_autocommit_read(session)  # one SELECT: no BEGIN and ROLLBACK round trips around it
        if not job_ids.is_full(job_id):  # a short id: one more SELECT, never on the full-id polling path
            job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant_id)
        return jobs_service.read(session, job_id=job_id, tenant_id=tenant_id)


@router.get(
    "",
    response_model=Page[JobSummary],
    summary="List your jobs, newest first, a page at a time",
    responses=problem_responses(401, 422, 503),
)
async def list_jobs(
    tenant: CurrentTenantDep,
    db: AsyncDbDep,
    limit: Annotated[int, Query(ge=1, le=200, description="Jobs per page")] = 50,
    cursor: Annotated[
        str | None, Query(min_length=1, max_length=512, description="next_cursor of the previous page")
    ] = None,
    status_filter: Annotated[
        list[JobStatus] | None,
        Query(alias="status", max_length=len(JobStatus), description="Only jobs in these states"),
    ] = None,
    teacher: Annotated[
        str | None, Query(min_length=1, max_length=512, description="Only jobs of this teacher")
    ] = None,
) -> Page[JobSummary]:
    # PostgreSQL: the query on the event loop (async pool). SQLite: one worker-thread hop for the query and
    # the summaries (a sync endpoint pays one more to validate the response).
    statuses = [s.value for s in status_filter or []]
    if db is None:
        return await run_in_threadpool(_list_jobs, tenant.tenant_id, limit, cursor, statuses, teacher)
    jobs, has_more, next_cursor = await jobs_service.list_page_async(
        db, limit=limit, cursor=cursor, statuses=statuses, teacher=teacher, tenant_id=tenant.tenant_id
    )
    return Page[JobSummary](
        data=[jobs_service.to_summary(j) for j in jobs], has_more=has_more, next_cursor=next_cursor
    )


def _list_jobs(
    tenant_id: str, limit: int, cursor: str | None, statuses: list[str], teacher: str | None
) -> Page[JobSummary]:
    with get_sessionmaker()() as session:
        begin_autocommit_read(session)  # one SELECT: no BEGIN and ROLLBACK round trips around it
        jobs, has_more, next_cursor = jobs_service.list_page(
            session, limit=limit, cursor=cursor, statuses=statuses, teacher=teacher, tenant_id=tenant_id
        )
        return Page[JobSummary](
            data=[jobs_service.to_summary(j) for j in jobs], has_more=has_more, next_cursor=next_cursor
        )


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    description="pending/queued -> cancelled at once (200); dispatched/running -> cancelling, the worker "
    "stops at its next check (202); cancelling again is accepted (202); a finished job answers 409.",
    responses={
        **problem_responses(401, 404, 422, 409, 503),
        200: {"model": JobRead, "description": "Cancelled at once"},
    },
)
def cancel_job(job_id: JobId, session: SessionDep, tenant: CurrentTenantDep, response: Response) -> JobRead:
    job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant.tenant_id)
    job = jobs_service.cancel(session, job_id=job_id, tenant_id=tenant.tenant_id)
    if job.status == JobStatus.cancelled:
        response.status_code = status.HTTP_200_OK
    return jobs_service.to_read(job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a finished job with its events, artifacts and checkpoints",
    responses=problem_responses(401, 404, 422, 409, 503),
)
def delete_job(
    job_id: JobId, session: SessionDep, settings: SettingsDep, tenant: CurrentTenantDep
) -> Response:
    job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant.tenant_id)
    jobs_service.delete_job(session, job_id=job_id, settings=settings, tenant_id=tenant.tenant_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_SSE_EXAMPLE = (
    "retry: 2000\n\n"
    'id: 41\nevent: state\ndata: {"id":41,"kind":"state","message":"dispatched -> running",...}\n\n'
    'event: snapshot\ndata: {"status":"running","progress":42.5,"phase":"distill",...}\n\n'
    ": keep-alive\n\n"
    'event: end\ndata: {"job_id":"...","status":"completed"}\n\n'
)


@router.get(
    "/{job_id}/events",
    response_model=Page[JobEventRead],
    summary="A job's state, progress and metric events: a page at a time, or live as Server-Sent Events",
    description="JSON (the default): a page of events in id order after `after`. With `Accept: "
    "text/event-stream`: every event after `after` or the `Last-Event-ID` header (`id:` the event id, "
    "`event:` its kind, `data:` the event as JSON), a `snapshot` event whenever the job's status or "
    "progress changes, `: keep-alive` comments every SSE_KEEPALIVE_SECONDS of silence, and a final `end` "
    "event once the job is completed, failed or cancelled.",
    responses={
        **problem_responses(401, 404, 409, 422, 503),
        200: {
            "description": "A page of events, or the live stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": _SSE_EXAMPLE}},
        },
    },
)
def list_job_events(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenantDep,
    settings: SettingsDep,
    after: Annotated[
        int, Query(ge=0, le=2**63 - 1, description="Only events with a larger id (next_cursor)")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[
        int | None,
        Header(ge=0, le=2**63 - 1, description="Stream: resume after this event id (sent by EventSource)"),
    ] = None,
) -> Page[JobEventRead] | StreamingResponse:
    job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant.tenant_id)
    jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant.tenant_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        stream = event_stream.stream_job_events(
            job_id,
            after=max(after, last_event_id or 0),
            poll_seconds=settings.sse_poll_seconds,
            keepalive_seconds=settings.sse_keepalive_seconds,
        )
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events, has_more = events_service.list_events(session, job_id=job_id, after=after, limit=limit)
    return Page[JobEventRead](
        data=[JobEventRead.model_validate(e, from_attributes=True) for e in events],
        has_more=has_more,
        next_cursor=str(events[-1].id) if has_more and events else None,
    )


@router.get(
    "/{job_id}/artifacts",
    response_model=list[ArtifactRead],
    summary="A job's artifacts: student weights, config, exported program, results.json",
    responses=problem_responses(401, 404, 409, 422, 503),
)
def list_artifacts(job_id: JobId, session: SessionDep, tenant: CurrentTenantDep) -> list[ArtifactRead]:
    job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant.tenant_id)
    jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant.tenant_id)
    return [artifacts_service.to_read(a) for a in artifacts_service.list_for_job(session, job_id=job_id)]


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    summary="Download one artifact",
    responses={
        **problem_responses(401, 404, 409, 422, 503),
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
    },
)
def download_artifact(
    job_id: JobId,
    name: Annotated[str, Path(min_length=1, max_length=255)],
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
) -> FileResponse:
    job_id = job_ids.resolve(session, job_id=job_id, tenant_id=tenant.tenant_id)
    jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant.tenant_id)
    artifact, path = artifacts_service.get_file(session, job_id=job_id, name=name, settings=settings)
    return FileResponse(
        path,
        media_type=artifact.media_type,
        filename=artifact.name,
        headers={"X-Content-SHA256": artifact.sha256},
    )
