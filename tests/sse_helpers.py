"""Reading Server-Sent Events in tests, and driving a job through its states with the real services."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.schemas.jobs import JobCreate
from app.services import auth as auth_service
from app.services import jobs as jobs_service
from app.services import lifecycle, scheduler
from app.services.lifecycle import Claim
from app.services.teachers import seed_default_teachers

DIGITS_JOB: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "distillation_method": "response_distillation",
    "task": "classification",
    "training_config": {"epochs": 3, "batch_size": 32},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}


@dataclass
class SseMessage:
    """One SSE message as a client sees it; `comment` holds a `:` line's text (keep-alives)."""

    event: str | None = None
    id: int | None = None
    data: Any = None
    comment: str | None = None
    retry: int | None = None
    raw: list[str] = field(default_factory=list)


def iter_sse(response: httpx.Response) -> Iterator[SseMessage]:
    """Parse an event-stream response into messages as they arrive."""
    message = SseMessage()
    data_lines: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data_lines:
                message.data = json.loads("\n".join(data_lines))
            if message.raw:
                yield message
            message, data_lines = SseMessage(), []
            continue
        message.raw.append(line)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            message.comment = value
        elif name == "event":
            message.event = value
        elif name == "id":
            message.id = int(value)
        elif name == "data":
            data_lines.append(value)
        elif name == "retry":
            message.retry = int(value)


def tenant_of(headers: dict[str, str]) -> str:
    """The tenant id behind bearer `headers` (as the API resolves it)."""
    with session_scope() as session:
        principal = auth_service.authenticate(session, key=headers["Authorization"].removeprefix("Bearer "))
    assert principal is not None
    return principal.tenant_id


def create_job(settings: Settings, tenant_id: str, **overrides: Any) -> str:
    """A pending job of `tenant_id` created through the jobs service; returns its id."""
    with session_scope() as session:
        seed_default_teachers(session)  # as the API does at start (a test may run before any server)
    with session_scope() as session:
        request = JobCreate(**(DIGITS_JOB | overrides))
        job = jobs_service.create(session, request=request, settings=settings, tenant_id=tenant_id)
        return job.id


def start_and_claim(settings: Settings, job_id: str, worker: str = "test-worker") -> Claim:
    """pending -> queued -> dispatched -> running, through the API's, scheduler's and worker's services."""
    with session_scope() as session:
        jobs_service.start(session, job_id=job_id, settings=settings, tenant_id=None)
    with session_scope() as session:
        admitted = scheduler.admit_queued_jobs(session, settings)
    assert job_id in admitted
    with session_scope() as session:
        claim = lifecycle.claim_job(session, job_id=job_id, worker=worker)
    assert claim is not None
    return claim


def report_epoch(claim: Claim, epoch: int, epochs: int, accuracy: float, loss: float) -> None:
    """What a worker reports after an epoch: progress on the row plus progress and metric events."""
    metrics = {
        "stage": 1,
        "epoch": epoch,
        "student_accuracy": accuracy,
        "total_loss": loss,
        "distillation_loss": loss * 0.6,
        "student_loss": loss * 0.4,
    }
    percent = 100.0 * epoch / epochs
    with session_scope() as session:
        lifecycle.update_progress(
            session,
            job_id=claim.job_id,
            lease_token=claim.lease_token,
            progress=percent,
            phase="distill",
            eta_seconds=float(epochs - epoch),
            metrics=metrics,
        )
        lifecycle.record_event(
            session,
            job_id=claim.job_id,
            kind="progress",
            message=f"distill {percent:.1f}%",
            data={"progress": percent, "phase": "distill", **metrics},
            attempt=claim.attempt,
        )
        lifecycle.record_event(
            session,
            job_id=claim.job_id,
            kind="metric",
            message=f"epoch {epoch}",
            data=metrics,
            attempt=claim.attempt,
        )


def training_history(epochs: int) -> list[dict[str, float | int]]:
    """A plausible per-epoch history: loss falling, accuracy rising."""
    return [
        {
            "stage": 1,
            "epoch": e,
            "student_accuracy": round(0.55 + 0.4 * e / epochs, 4),
            "distillation_loss": round(1.2 / e, 4),
            "student_loss": round(0.8 / e, 4),
            "total_loss": round(2.0 / e, 4),
            "seconds": 0.4,
        }
        for e in range(1, epochs + 1)
    ]


def results_for(epochs: int) -> dict[str, Any]:
    """A complete DistillationResults document for a digits job of `epochs` epochs."""
    return {
        "task": "classification",
        "metric": "accuracy",
        "device": "cpu",
        "teacher_accuracy": 0.9806,
        "initial_student_accuracy": 0.1,
        "final_student_accuracy": 0.9556,
        "best_student_accuracy": 0.9583,
        "accuracy_retention": 0.9745,
        "original_parameters": 120_000,
        "compressed_parameters": 30_000,
        "compression_ratio": 0.25,
        "target_compression": 0.25,
        "parameter_reduction": 0.75,
        "model_size_mb": {"teacher": 0.4578, "student": 0.1144},
        "memory_savings": 0.75,
        "latency_ms": {
            "teacher": {"batch_1": 0.21, "batch_64": 1.9},
            "student": {"batch_1": 0.05, "batch_64": 0.3},
        },
        "inference_speedup": 4.2,
        "cost_savings": 0.7619,
        "training_history": training_history(epochs),
        "baseline_accuracy": 0.9361,
        "kd_gain": 1.95,
        "training_seconds": 1.2,
        "total_seconds": 2.0,
    }


def complete(
    claim: Claim,
    epochs: int,
    artifact_files: dict[str, bytes] | None = None,
    results: dict[str, Any] | None = None,
) -> None:
    """running -> completed with full results (default `results_for(epochs)`) and `artifact_files`."""
    settings = get_settings()
    artifacts = []
    for name, content in (artifact_files or {}).items():
        path = settings.jobs_dir / claim.job_id / "artifacts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        artifacts.append(lifecycle.describe_artifact(path))
    with session_scope() as session:
        assert lifecycle.complete_job(
            session,
            job_id=claim.job_id,
            lease_token=claim.lease_token,
            attempt=claim.attempt,
            results=results if results is not None else results_for(epochs),
            artifacts=artifacts,
        )
