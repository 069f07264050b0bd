"""The one Celery task, `distillery.run_job`: claim the job, run the engine, record how it ended.

Thin by design: the engine (`workers.distill.runner.run_job`) trains, `workers.reporting` writes progress
and heartbeats, `app.services.lifecycle` does every lease-guarded write. Whatever happens, a claimed job
leaves `running`: completed, failed with `error: {code, message}`, cancelled, or (lease lost) left to the
worker that now holds it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.core.celery_client import TASK_RUN_JOB, wake_scheduler
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.errors import NotFound
from app.schemas.job_spec import FileDataset, JobSpec, UploadedDataset
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from app.services import lifecycle, teacher_caches
from app.services.datasets import get_dataset_path
from app.services.lifecycle import Claim
from app.services.scheduler import admit_and_dispatch
from app.services.teachers import get_teacher_source
from workers.celery_app import celery_app
from workers.distill.contract import EngineError, JobPaths, JobStopped
from workers.reporting import JobReporter

log = logging.getLogger(__name__)

T = TypeVar("T")

# Final writes (results, failure) are retried through short database outages before giving up; if they
# still fail, the job's heartbeat goes stale and the scheduler re-queues it (the re-run resumes).
_FINAL_WRITE_ATTEMPTS = 6


@celery_app.task(name=TASK_RUN_JOB, bind=True, acks_late=True, ignore_result=True)
def run_job_task(self: Any, job_id: str) -> str:
    """Run one distillation job by id; returns how it ended (for logs only)."""
    worker = f"{self.request.hostname or socket.gethostname()}/{os.getpid()}"
    return execute_job(job_id, worker=worker)


def execute_job(job_id: str, *, worker: str, settings: Settings | None = None) -> str:
    """Claim `job_id` and run it to an end state; 'dropped' when it could not be claimed."""
    settings = settings or get_settings()
    with session_scope() as session:
        claim = lifecycle.claim_job(session, job_id=job_id, worker=worker)
    if claim is None:
        log.info("job %s: not claimable (already claimed, cancelled or gone); message dropped", job_id)
        return "dropped"
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker, claim.attempt)
    try:
        outcome = _run_claimed(claim, settings)
    finally:
        _after_job(settings)
    log.info("job %s: %s", job_id, outcome)
    return outcome


def _run_claimed(claim: Claim, settings: Settings) -> str:
    paths = JobPaths(settings.jobs_dir / claim.job_id)
    with JobReporter(claim, settings) as reporter:
        try:
            spec, teacher, file_root = _prepare(claim, settings)
            from workers.distill.config import EngineConfig
            from workers.distill.runner import named_student, run_job

            student = named_student(spec, registry=_registry_lookup)

            results = run_job(
                spec,
                teacher=teacher,
                paths=paths,
                data_dir=settings.data_dir,
                callbacks=reporter,
                resume=True,
                file_root=file_root,
                trust_remote_code=settings.trust_remote_code,
                config=dataclasses.replace(
                    EngineConfig.from_settings(settings), signal_cache_owner=_cache_owner(claim)
                ),
                student=student,
            )
        except JobStopped:
            reporter.close()
            return _stopped(claim, lease_lost=reporter.lease_lost)
        except EngineError as exc:
            reporter.close()
            return _fail(claim, exc.code, exc.message)
        except Exception as exc:  # any other failure still ends the job, with the reason stored
            log.exception("job %s: unexpected error", claim.job_id)
            reporter.close()
            return _fail(claim, "internal_error", f"{type(exc).__name__}: {exc}")
    if reporter.lease_lost:
        return "lease lost; results discarded"
    artifacts = _describe_artifacts(paths.artifacts)
    stored = _retry(
        "store results",
        lambda: _in_session(
            lambda session: lifecycle.complete_job(
                session,
                job_id=claim.job_id,
                lease_token=claim.lease_token,
                attempt=claim.attempt,
                results=results.model_dump(mode="json"),
                artifacts=artifacts,
            )
        ),
    )
    return "completed" if stored else "lease lost; results discarded"


def _cache_owner(claim: Claim) -> str:
    """Whose teacher-signal caches the job reuses and creates: its tenant's (app.services.teacher_caches)."""
    with session_scope() as session:
        return teacher_caches.owner_of_job(session, job_id=claim.job_id)


def _registry_lookup(name: str) -> TeacherSource:
    """A registered model by name (a 'registry' student); EngineError listing the valid names otherwise."""
    with session_scope() as session:
        try:
            return get_teacher_source(session, name)
        except NotFound as exc:
            raise EngineError("student_not_found", exc.detail) from exc


def _prepare(claim: Claim, settings: Settings) -> tuple[JobSpec, TeacherSource, Path | None]:
    """The validated spec (uploaded dataset resolved to its file), the teacher source and the file root."""
    try:
        spec = JobSpec.model_validate(claim.spec)
    except ValidationError as exc:
        raise EngineError("invalid_spec", f"the stored job spec is no longer valid: {exc}") from exc
    file_root: Path | None = settings.file_root
    with session_scope() as session:
        try:
            teacher = get_teacher_source(session, spec.teacher_model_name)
        except NotFound as exc:
            raise EngineError("unknown_teacher", exc.detail) from exc
        if isinstance(spec.dataset_config, UploadedDataset):
            try:
                path = get_dataset_path(session, spec.dataset_config.dataset_id).resolve()
            except NotFound as exc:
                raise EngineError("unknown_dataset", exc.detail) from exc
            spec = spec.model_copy(update={"dataset_config": FileDataset(path=str(path))})
            # Uploads are written by the service itself; if they live outside the allowed root (custom
            # ALLOWED_FILE_ROOT), the root check is only needed for a local teacher path.
            if (
                file_root is not None
                and not path.is_relative_to(file_root)
                and teacher.kind != TeacherSourceKind.local
            ):
                file_root = None
    return spec, teacher, file_root


def _describe_artifacts(folder: Path) -> list[lifecycle.ArtifactFile]:
    """Every regular file the engine left in the artifacts folder (sub-folders are listed in results)."""
    if not folder.is_dir():
        return []
    return [lifecycle.describe_artifact(path) for path in sorted(folder.iterdir()) if path.is_file()]


def _stopped(claim: Claim, *, lease_lost: bool) -> str:
    if lease_lost:
        return "stopped: lease lost"
    cancelled = _retry(
        "record cancel",
        lambda: _in_session(
            lambda session: lifecycle.cancel_stopped_job(
                session, job_id=claim.job_id, lease_token=claim.lease_token, attempt=claim.attempt
            )
        ),
    )
    return "cancelled" if cancelled else "stopped: lease lost"


def _fail(claim: Claim, code: str, message: str) -> str:
    stored = _retry(
        "record failure",
        lambda: _in_session(
            lambda session: lifecycle.fail_job(
                session,
                job_id=claim.job_id,
                lease_token=claim.lease_token,
                attempt=claim.attempt,
                code=code,
                message=message,
            )
        ),
    )
    return f"failed ({code}): {message}" if stored else "failed; lease lost"


def _in_session(action: Callable[[Any], T]) -> T:
    with session_scope() as session:
        return action(session)


def _retry(what: str, action: Callable[[], T]) -> T:
    """Run a final write, retrying database errors with backoff (1, 2, 4 … s)."""
    delay = 1.0
    for attempt in range(1, _FINAL_WRITE_ATTEMPTS + 1):
        try:
            return action()
        except SQLAlchemyError as exc:
            if attempt == _FINAL_WRITE_ATTEMPTS:
                raise
            log.warning(
                "%s failed (attempt %d, retrying in %.0f s): %s", what, attempt, delay, exc.__class__.__name__
            )
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
    raise AssertionError("unreachable")


def _after_job(settings: Settings) -> None:
    """A slot is free: admit the next queued job now and wake the scheduler."""
    try:
        admit_and_dispatch(settings)
    except SQLAlchemyError as exc:
        log.warning(
            "admission after job end failed (the scheduler's tick retries): %s", exc.__class__.__name__
        )
    wake_scheduler(settings)
