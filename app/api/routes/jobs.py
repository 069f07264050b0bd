"""The jobs resource: create, start, read, list, cancel, delete, events and artifacts. Thin: services work."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.convertors import StringConvertor, register_url_convertor

from app.api.deps import (
    AsyncDbDep,
    CheckedQueryRoute,
    CurrentTenantDep,
    SessionDep,
    SettingsDep,
    WakeSchedulerDep,
    get_async_db,
)
from app.core.config import Settings
from app.core.db import begin_autocommit_read, get_sessionmaker
from app.errors import Unprocessable
from app.models import Job, JobStatus
from app.schemas.checkpoints import CheckpointRead
from app.schemas.estimates import JobEstimate
from app.schemas.jobs import (
    DIGITS_JOB_EXAMPLE,
    METADATA_KEY_MAX,
    METADATA_KEY_PATTERN,
    METADATA_MAX_PAIRS,
    METADATA_VALUE_MAX,
    ArtifactRead,
    JobCreate,
    JobEventRead,
    JobRead,
    JobSummary,
)
from app.schemas.page import Page
from app.schemas.problem import problem_responses
from app.schemas.webhooks import WebhookDeliveryRead
from app.services import artifacts as artifacts_service
from app.services import checkpoints as checkpoints_service
from app.services import estimates as estimates_service
from app.services import event_stream, idempotency, job_ids
from app.services import events as events_service
from app.services import jobs as jobs_service
from app.services import webhooks as webhooks_service
from app.services.auth import Principal

router = APIRouter(prefix="/distillation/jobs", tags=["jobs"], route_class=CheckedQueryRoute)


class _JobIdConvertor(StringConvertor):
    """A job id in the path: anything but `estimate`, so /distillation/jobs/estimate (POST) is no job's
    path and its 405 does not advertise the GET and DELETE of /distillation/jobs/{job_id}."""

    regex = r"(?!estimate$)[^/]+"


register_url_convertor("job_id", _JobIdConvertor())

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
        read = await jobs_service.create_pending_async(
            db, request=request, tenant_id=tenant.tenant_id, settings=settings
        )
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
    "/estimate",
    response_model=JobEstimate,
    summary="Estimate a job before launching it",
    description="The same body as POST /distillation/jobs (checked the same way, nothing is stored): "
    "teacher and student sizes, the dataset's size, the training FLOPs and the expected training seconds "
    "from this service's measured throughput on finished jobs of the same task, device type and teacher "
    "size, with the basis stated (or `no history: FLOP count only`).",
    responses=problem_responses(401, 422, 503),
)
def estimate_job(
    request: Annotated[JobCreate, Body(openapi_examples=_CREATE_EXAMPLES)],
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
) -> JobEstimate:
    spec = jobs_service.check_spec(
        session, spec=request.spec(), settings=settings, tenant_id=tenant.tenant_id
    )
    parent = (
        checkpoints_service.resolve_parent(
            session, source=request.from_checkpoint, spec=spec, tenant_id=tenant.tenant_id
        )
        if request.from_checkpoint is not None
        else None
    )
    estimate = estimates_service.estimate(
        session,
        spec=spec,
        tenant_id=tenant.tenant_id,
        settings=settings,
        start_epoch=parent.epoch if parent else 0,
    )
    return JobEstimate.model_validate(estimate)


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
    "/{job_id:job_id}",
    response_model=JobRead,
    summary="A job's status, progress, ETA, metrics and results",
    responses=problem_responses(401, 404, 409, 422, 503),
)
async def get_job(request: Request, job_id: JobId, tenant: CurrentTenantDep) -> JobRead:
    # The hot polling path: on PostgreSQL one SELECT on the event loop (async read pool, no thread hop, no
    # request session; concurrent polls share it), on SQLite one worker-thread hop for the query. The pool
    # is taken from the request, not as a dependency: one dependency less to resolve per poll.
    db = await get_async_db(request)
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
    request: Request,
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
    name: Annotated[
        str | None, Query(min_length=1, max_length=256, description="Only jobs with this name")
    ] = None,
    metadata_filter: Annotated[
        str | None,
        Query(
            alias="metadata[key]",
            description="Only jobs whose metadata has `key` = this value: write the key in the brackets, "
            "e.g. `metadata[team]=vision`; repeat with other keys to require all of them.",
        ),
    ] = None,
) -> Page[JobSummary]:
    # PostgreSQL: the query on the event loop (async pool). SQLite: one worker-thread hop for the query and
    # the summaries (a sync endpoint pays one more to validate the response).
    statuses = [s.value for s in status_filter or []]
    metadata = _metadata_filters(request)
    if db is None:
        return await run_in_threadpool(
            _list_jobs, tenant.tenant_id, limit, cursor, statuses, teacher, name, metadata
        )
    jobs, has_more, next_cursor = await jobs_service.list_page_async(
        db,
        limit=limit,
        cursor=cursor,
        statuses=statuses,
        teacher=teacher,
        name=name,
        metadata=metadata,
        tenant_id=tenant.tenant_id,
    )
    return jobs_service.summary_page(jobs, has_more=has_more, next_cursor=next_cursor)


_METADATA_PARAM = re.compile(r"^metadata\[(.*)\]$")


def _metadata_filters(request: Request) -> dict[str, str]:
    """`metadata[key]=value` query parameters as {key: value}; 422 naming the parameter when malformed."""
    filters: dict[str, str] = {}
    for param, value in request.query_params.multi_items():
        if not param.startswith("metadata"):
            continue
        match = _METADATA_PARAM.match(param)
        problem = None
        if match is None:
            problem = "filter on metadata as metadata[key]=value"
        else:
            key = match.group(1)
            if not key or len(key) > METADATA_KEY_MAX or not re.match(METADATA_KEY_PATTERN, key):
                problem = f"metadata keys are 1-{METADATA_KEY_MAX} characters of letters, digits, '_.:-'"
            elif len(value) > METADATA_VALUE_MAX:
                problem = f"metadata values are at most {METADATA_VALUE_MAX} characters"
            elif key in filters:
                problem = "give each metadata key once"
            else:
                filters[key] = value
        if problem is None and len(filters) > METADATA_MAX_PAIRS:
            problem = f"at most {METADATA_MAX_PAIRS} metadata filters"
        if problem is not None:
            raise Unprocessable(
                f"query parameter {param[:100]}: {problem}",
                errors=[
                    {
                        "loc": ["query", param[:100]],
                        "field": param[:100],
                        "msg": problem,
                        "type": "value_error",
                    }
                ],
            )
    return filters


def _list_jobs(
    tenant_id: str,
    limit: int,
    cursor: str | None,
    statuses: list[str],
    teacher: str | None,
    name: str | None,
    metadata: dict[str, str],
) -> Page[JobSummary]:
    with get_sessionmaker()() as session:
        begin_autocommit_read(session)  # one SELECT: no BEGIN and ROLLBACK round trips around it
        jobs, has_more, next_cursor = jobs_service.list_page(
            session,
            limit=limit,
            cursor=cursor,
            statuses=statuses,
            teacher=teacher,
            name=name,
            metadata=metadata,
            tenant_id=tenant_id,
        )
        return jobs_service.summary_page(jobs, has_more=has_more, next_cursor=next_cursor)


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    description="pending/queued/paused -> cancelled at once (200); dispatched/running/pausing -> "
    "cancelling, the worker stops at its next check (202); cancelling again is accepted (202); a finished "
    "job answers 409.",
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


@router.post(
    "/{job_id}/pause",
    response_model=JobRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Pause a job",
    description="running -> pausing: the worker stops at its next check, keeps its checkpoint and frees "
    "the slot (-> paused, 202); queued/dispatched -> paused at once (200); pausing or paused again is "
    "accepted as it is; pending, cancelling and finished jobs answer 409.",
    responses={
        **problem_responses(401, 404, 422, 409, 503),
        200: {"model": JobRead, "description": "Paused at once"},
    },
)
def pause_job(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return _idempotent_state_change(
        session,
        settings,
        tenant,
        idempotency_key,
        path=f"/distillation/jobs/{job_id}/pause",
        change=lambda commit: jobs_service.pause(
            session, job_id=job_id, tenant_id=tenant.tenant_id, commit=commit
        ),
        status_for=lambda job: (
            status.HTTP_200_OK if job.status == JobStatus.paused else status.HTTP_202_ACCEPTED
        ),
    )


def _idempotent_state_change(
    session: Session,
    settings: Settings,
    tenant: Principal,
    idempotency_key: str | None,
    *,
    path: str,
    change: Callable[[bool], Job],
    status_for: Callable[[Job], int],
) -> JSONResponse:
    """Run a bodiless state-change POST; with an Idempotency-Key, a repeat replays the first answer."""
    record = None
    if idempotency_key is not None:
        found = idempotency.begin(
            session,
            tenant_id=tenant.tenant_id,
            key=idempotency_key,
            fingerprint=idempotency.request_hash("POST", path, None),
            ttl_hours=settings.idempotency_ttl_hours,
        )
        if isinstance(found, idempotency.StoredResponse):
            return _replay(found)
        record = found
    job = change(record is None)  # with a record: flushed, committed by `finish` together with it
    body = jobs_service.to_read(job).model_dump(mode="json")
    code = status_for(job)
    if record is not None:
        idempotency.finish(session, record, status_code=code, body=body, headers={})
    return JSONResponse(body, status_code=code)


@router.post(
    "/{job_id}/resume",
    response_model=JobRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Resume a paused job",
    description="paused -> queued; the run continues from its checkpoint on any worker and repeats no "
    "finished epoch. 409 while the job is still pausing or in any other state; 429 with Retry-After when "
    "the queue is full.",
    responses=problem_responses(401, 404, 422, 409, 429, 503),
)
def resume_job(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
    wake: WakeSchedulerDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    response = _idempotent_state_change(
        session,
        settings,
        tenant,
        idempotency_key,
        path=f"/distillation/jobs/{job_id}/resume",
        change=lambda commit: jobs_service.resume(
            session, job_id=job_id, settings=settings, tenant_id=tenant.tenant_id, commit=commit
        ),
        status_for=lambda job: status.HTTP_202_ACCEPTED,
    )
    if wake:
        background.add_task(jobs_service.wake_scheduler, settings)
    return response


@router.get(
    "/{job_id}/checkpoints",
    response_model=list[CheckpointRead],
    summary="A job's kept checkpoints: last, best and the latest epochs, with their validation metric",
    description="CHECKPOINT_KEEP says how many are kept per job. Start a new job from one with "
    '`from_checkpoint: {"job_id": ..., "checkpoint": "best"}`.',
    responses=problem_responses(401, 404, 422, 503),
)
def list_checkpoints(
    job_id: JobId, session: SessionDep, settings: SettingsDep, tenant: CurrentTenantDep
) -> list[CheckpointRead]:
    jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant.tenant_id)
    rows = checkpoints_service.list_for_job(session, job_id=job_id)
    return [
        CheckpointRead(
            name=row.name,
            kind=row.kind,
            stage=row.stage,
            epoch=row.epoch,
            metric=row.metric_name,
            validation_metric=row.metric_value,
            created_at=row.created_at,
            bytes=_file_size(row.weights_path, row.size_bytes),
            url=f"/distillation/jobs/{job_id}/checkpoints/{row.name}",
        )
        for row in rows
    ]


def _file_size(path: str, recorded: int) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return recorded


@router.get(
    "/{job_id}/checkpoints/{name}",
    response_class=FileResponse,
    summary="Download the student weights of one kept checkpoint (safetensors)",
    responses={
        **problem_responses(401, 404, 422, 503),
        200: {"content": {"application/octet-stream": {}}, "description": "The safetensors file"},
    },
)
def download_checkpoint(
    job_id: JobId,
    name: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")],
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
) -> FileResponse:
    jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant.tenant_id)
    row, path = checkpoints_service.get_file(session, job_id=job_id, name=name, settings=settings)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job_id}-{row.name}.safetensors",
        headers={"X-Checkpoint-Epoch": str(row.epoch), "X-Checkpoint-Stage": str(row.stage)},
    )


@router.get(
    "/{job_id}/webhook-deliveries",
    response_model=list[WebhookDeliveryRead],
    summary="The webhook deliveries of a job: every event, endpoint, attempt count and last outcome",
    responses=problem_responses(401, 404, 422, 503),
)
def list_webhook_deliveries(
    job_id: JobId, session: SessionDep, tenant: CurrentTenantDep
) -> list[WebhookDeliveryRead]:
    jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant.tenant_id)
    return [
        WebhookDeliveryRead.model_validate(d, from_attributes=True)
        for d in webhooks_service.list_deliveries(session, job_id=job_id, tenant_id=tenant.tenant_id)
    ]


@router.delete(
    "/{job_id:job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a finished or paused job with its events, artifacts and checkpoints",
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
