"""The one Celery task, `distillery.run_job`: claim the job, run the engine, record how it ended.

Thin by design: the engine (`workers.distill.runner.run_job`) trains, `workers.reporting` writes progress
and heartbeats, `app.services.lifecycle` does every lease-guarded write. Whatever happens, a claimed job
leaves `running`: completed, failed with `error: {code, message}`, cancelled, paused (its checkpoint kept
for the resume), or (lease lost) left to the worker that now holds it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.core.celery_client import TASK_RUN_JOB, wake_scheduler
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.paths import PathKind, PathRefused, redact_paths, resolve_path
from app.errors import NotFound
from app.models import Job
from app.schemas.job_spec import (
    FileDataset,
    FileSource,
    JobSpec,
    LocalStudent,
    UploadedDataset,
    UploadedSource,
)
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from app.services import checkpoints, estimates, file_roots, lifecycle, teacher_caches
from app.services.datasets import get as get_dataset
from app.services.file_roots import FILES_DISABLED_CODE, FILES_DISABLED_MESSAGE
from app.services.lifecycle import Claim
from app.services.scheduler import admit_and_dispatch
from app.services.teachers import get_teacher_source, record_measured_params
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
            spec, teacher, root, tenant_id = _prepare(claim, settings)
            from workers.distill.config import EngineConfig
            from workers.distill.runner import named_student, run_job

            student = named_student(
                spec, registry=functools.partial(_registry_lookup, root=root, tenant_id=tenant_id)
            )

            results = run_job(
                spec,
                teacher=teacher,
                paths=paths,
                data_dir=settings.data_dir,
                callbacks=reporter,
                resume=True,
                file_root=None,  # every path was resolved and checked under the tenant's root above
                trust_remote_code=settings.trust_remote_code,
                config=dataclasses.replace(
                    EngineConfig.from_settings(settings), signal_cache_owner=_cache_owner(claim)
                ),
                student=student,
                start_from=_parent_weights(paths),
            )
        except JobStopped:
            reporter.close()
            return _stopped(claim, lease_lost=reporter.lease_lost)
        except EngineError as exc:
            reporter.close()
            return _fail(claim, exc.code, _redacted(exc.message, settings))
        except Exception as exc:  # any other failure still ends the job, with the reason stored
            log.exception("job %s: unexpected error", claim.job_id)
            reporter.close()
            return _fail(claim, "internal_error", _redacted(f"{type(exc).__name__}: {exc}", settings))
    if reporter.lease_lost:
        return "lease lost; results discarded"
    artifacts = _describe_artifacts(paths.artifacts)
    stored_results = results.model_dump(mode="json")
    estimate = _measured_estimate(claim, stored_results)
    if estimate is not None:
        stored_results["estimate"] = _estimate_comparison(estimate)
    stored = _under_lease(
        "store results",
        claim,
        lifecycle.complete_job,
        results=stored_results,
        artifacts=artifacts,
        estimate=estimate,
    )
    if stored:
        _record_teacher_size(spec.teacher_model_name, tenant_id, stored_results.get("original_parameters"))
        return "completed"
    # Not completed: a cancel that landed after the engine's last stop check ends the job as cancelled, as
    # the cancel's answer said (its results are not stored); otherwise the lease is gone.
    cancelled = _under_lease(
        "record cancel",
        claim,
        lifecycle.cancel_stopped_job,
        reason="cancelled after training, before its results were stored (results discarded)",
    )
    return "cancelled" if cancelled else "lease lost; results discarded"


def _record_teacher_size(name: str, tenant_id: str | None, params: Any) -> None:
    """A teacher registered without `params` gets the count its finished job measured (best effort: the
    job is already completed, so a failure here is logged, never the job's)."""
    if not isinstance(params, int) or isinstance(params, bool):
        return
    try:
        with session_scope() as session:
            if record_measured_params(session, name=name, tenant_id=tenant_id, params=params):
                log.info("teacher %s: parameter count %d measured by a finished job", name, params)
    except SQLAlchemyError as exc:
        log.warning("teacher %s: could not store its measured size: %s", name, exc.__class__.__name__)


def _cache_owner(claim: Claim) -> str:
    """Whose teacher-signal caches the job reuses and creates: its tenant's (app.services.teacher_caches)."""
    with session_scope() as session:
        return teacher_caches.owner_of_job(session, job_id=claim.job_id)


def _parent_weights(paths: JobPaths) -> Path | None:
    """The kept checkpoint a fork starts from (copied into its folder at create), if it is one."""
    path = paths.work_dir / checkpoints.PARENT_WEIGHTS
    return path if path.is_file() else None


def _measured_estimate(claim: Claim, results: dict[str, Any]) -> dict[str, Any] | None:
    """The job's stored estimate with what this run measured (feeds later estimates); None without one."""
    try:
        with session_scope() as session:
            stored = session.scalar(select(Job.estimate).where(Job.id == claim.job_id))
        return estimates.measured(JobSpec.model_validate(claim.spec), stored, results)
    except (SQLAlchemyError, ValidationError) as exc:
        log.warning("job %s: estimate not compared: %s", claim.job_id, exc.__class__.__name__)
        return None


def _estimate_comparison(estimate: dict[str, Any]) -> dict[str, Any]:
    """What `results.estimate` shows: expected vs actual training seconds (ratio = actual / expected)."""
    actual = estimate.get("actual") or {}
    return {
        "expected_training_seconds": estimate.get("expected_training_seconds"),
        "actual_training_seconds": actual.get("training_seconds"),
        "ratio": actual.get("ratio"),
        "basis": estimate.get("basis"),
    }


def _prepare(claim: Claim, settings: Settings) -> tuple[JobSpec, TeacherSource, Path | None, str | None]:
    """The validated spec and teacher source with every path resolved and checked, and the tenant's root.

    Uploaded datasets (the main one and held-out splits) become their stored files (written by the service,
    under DATA_DIR; only the job's tenant's own); `file` datasets, a local teacher and a local student are
    resolved under the job's tenant's file root with the helper the API used (a root removed since the job
    was created refuses them now). The engine then gets checked absolute paths and no root of its own.
    """
    try:
        spec = JobSpec.model_validate(claim.spec)
    except ValidationError as exc:
        raise EngineError("invalid_spec", f"the stored job spec is no longer valid: {exc}") from exc
    with session_scope() as session:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == claim.job_id))
        try:
            teacher = get_teacher_source(session, spec.teacher_model_name, tenant_id=tenant_id)
        except NotFound as exc:
            raise EngineError("unknown_teacher", exc.detail) from exc
        root = file_roots.root_for(session, settings=settings, tenant_id=tenant_id)

        def resolved(source: Any) -> Any:
            if isinstance(source, UploadedSource):
                dataset = get_dataset(session, dataset_id=source.dataset_id, tenant_id=tenant_id)
                if dataset is None:
                    raise EngineError("unknown_dataset", f"No dataset with id '{source.dataset_id}'.")
                return FileSource(path=str(Path(dataset.path).resolve()))
            if isinstance(source, FileSource):
                path = _server_path(source.path, root, PathKind.any, what="dataset", code="dataset_invalid")
                return source.model_copy(update={"path": str(path)})
            return source

        dataset = spec.dataset_config
        updates: dict[str, Any] = {
            split: resolved(getattr(dataset, split))
            for split in ("validation", "test")
            if getattr(dataset, split, None) is not None
        }
        if isinstance(dataset, UploadedDataset):
            main = resolved(UploadedSource(dataset_id=dataset.dataset_id))
            dataset = FileDataset(path=main.path, **updates)
        elif isinstance(dataset, FileDataset):
            dataset = dataset.model_copy(
                update={"path": resolved(FileSource(path=dataset.path)).path} | updates
            )
        elif updates:
            dataset = dataset.model_copy(update=updates)
    spec_updates: dict[str, Any] = {"dataset_config": dataset}
    if isinstance(spec.student, LocalStudent):
        path = _server_path(
            spec.student.path, root, PathKind.directory, what="student directory", code="student_not_found"
        )
        spec_updates["student"] = spec.student.model_copy(update={"path": str(path)})
    spec = spec.model_copy(update=spec_updates)
    return spec, _local_resolved(teacher, root, code="teacher_not_found"), root, tenant_id


def _local_resolved(source: TeacherSource, root: Path | None, *, code: str) -> TeacherSource:
    """A registry entry with its local directory resolved under the tenant's root (others unchanged)."""
    if source.kind != TeacherSourceKind.local:
        return source
    # A directory (save_pretrained, safetensors + config) or a .pt2 program file (checked by the engine).
    directory = _server_path(source.location, root, PathKind.any, what=f"'{source.name}' model", code=code)
    return source.model_copy(update={"location": str(directory)})


def _registry_lookup(name: str, *, root: Path | None, tenant_id: str | None) -> TeacherSource:
    """A registered model by name (a 'registry' student) as the job's tenant sees it, its local directory
    checked under the root."""
    with session_scope() as session:
        try:
            source = get_teacher_source(session, name, tenant_id=tenant_id)
        except NotFound as exc:
            raise EngineError("student_not_found", exc.detail) from exc
    return _local_resolved(source, root, code="student_not_found")


def _server_path(text: str, root: Path | None, kind: PathKind, *, what: str, code: str) -> Path:
    """A tenant-named path resolved under its file root; EngineError when refused (never an absolute path)."""
    if root is None:
        raise EngineError(FILES_DISABLED_CODE, f"{what} '{text}': {FILES_DISABLED_MESSAGE}")
    try:
        return resolve_path(text, root=root, kind=kind, what=what)
    except PathRefused as exc:
        raise EngineError(code if exc.code == "path_not_found" else exc.code, exc.message) from exc


def _redacted(message: str, settings: Settings) -> str:
    """A failure message without the server's absolute storage paths (a tenant reads it through the API)."""
    labels = {settings.data_dir: "DATA_DIR"}
    if settings.file_root is not None:
        labels[settings.file_root] = "ALLOWED_FILE_ROOT"
    return redact_paths(message, labels)


def _describe_artifacts(folder: Path) -> list[lifecycle.ArtifactFile]:
    """Every regular file the engine left in the artifacts folder (sub-folders are listed in results)."""
    if not folder.is_dir():
        return []
    return [lifecycle.describe_artifact(path) for path in sorted(folder.iterdir()) if path.is_file()]


def _stopped(claim: Claim, *, lease_lost: bool) -> str:
    """The engine stopped on request: cancelled or paused (checkpoint kept), as the request said."""
    if lease_lost:
        return "stopped: lease lost"
    ended = _under_lease("record stop", claim, lifecycle.end_stopped_job)
    return ended or "stopped: lease lost"


def _fail(claim: Claim, code: str, message: str) -> str:
    stored = _under_lease("record failure", claim, lifecycle.fail_job, code=code, message=message)
    return f"failed ({code}): {message}" if stored else "failed; lease lost"


def _under_lease(what: str, claim: Claim, write: Callable[..., T], **fields: Any) -> T:
    """`write(session, job_id=, lease_token=, attempt=, **fields)`: one of the lifecycle's lease-guarded
    writes for this claim, in its own session, retried over database errors (`_retry`)."""
    return _retry(
        what,
        lambda: _in_session(
            lambda session: write(
                session, job_id=claim.job_id, lease_token=claim.lease_token, attempt=claim.attempt, **fields
            )
        ),
    )


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
