"""Request and response models of the jobs resource (the spec itself is `job_spec.JobSpec`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.job_spec import JobSpec

# Metadata bounds (as OpenAI's jobs API): 16 pairs, keys up to 64 characters, values up to 512.
METADATA_MAX_PAIRS = 16
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 512
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.:-]+$"
_REQUEST_ONLY_FIELDS = {"auto_start", "name", "metadata", "from_checkpoint"}


def check_metadata(value: dict[str, str]) -> dict[str, str]:
    """At most 16 pairs; keys 1-64 characters of [A-Za-z0-9_.:-]; values up to 512 characters."""
    if len(value) > METADATA_MAX_PAIRS:
        raise ValueError(f"at most {METADATA_MAX_PAIRS} metadata pairs, got {len(value)}")
    for key, item in value.items():
        if not 1 <= len(key) <= METADATA_KEY_MAX or not re.match(METADATA_KEY_PATTERN, key):
            raise ValueError(
                f"metadata key {key[:80]!r} must be 1-{METADATA_KEY_MAX} characters of letters, digits, "
                "'_', '.', ':' or '-'"
            )
        if len(item) > METADATA_VALUE_MAX:
            raise ValueError(f"metadata value of {key!r} is longer than {METADATA_VALUE_MAX} characters")
    return value


class FromCheckpoint(BaseModel):
    """Start from a kept checkpoint of another job of the same tenant (GET .../checkpoints lists them)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=1, max_length=64, description="The job whose checkpoint to start from")
    checkpoint: str = Field(
        default="best", min_length=1, max_length=64, description="Its name: last, best or epoch-N"
    )


DIGITS_JOB_EXAMPLE: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "distillation_method": "response_distillation",
    "task": "classification",
    "training_config": {
        "epochs": 10,
        "batch_size": 64,
        "learning_rate": 0.001,
        "temperature": 4.0,
        "alpha": 0.7,
        "seed": 0,
        "baseline": True,
    },
    "dataset_config": {"kind": "builtin", "name": "digits"},
    "auto_start": True,
}


class JobCreate(JobSpec):
    """A job spec plus `auto_start`: queue the job at once instead of leaving it pending."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [DIGITS_JOB_EXAMPLE]})

    auto_start: bool = Field(
        strict=True, default=False, description="Queue the job at once (as POST .../start does)."
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=256, description="A name of yours for the job (filterable)."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description=f"Up to {METADATA_MAX_PAIRS} string pairs of yours (keys up to {METADATA_KEY_MAX} "
        f"characters, values up to {METADATA_VALUE_MAX}); lists filter on them with `metadata[key]=value`.",
        examples=[{"team": "vision", "experiment": "kd-t4"}],
    )
    from_checkpoint: FromCheckpoint | None = Field(
        default=None,
        description="Start from another job's kept checkpoint: continue to more epochs, or fork with other "
        "hyperparameters. Only the epochs after the checkpoint's are trained.",
    )

    _check_metadata = field_validator("metadata")(check_metadata)

    def spec(self) -> JobSpec:
        """The job spec without the request-only fields."""
        return JobSpec.model_validate(self.model_dump(exclude=_REQUEST_ONLY_FIELDS))


class JobError(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class JobSummary(BaseModel):
    """A job in a list: state and progress, without spec, metrics and results."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11",
                    "status": "running",
                    "progress": 42.5,
                    "phase": "distill",
                    "teacher_model_name": "digits-cnn",
                    "target_compression": 0.25,
                    "distillation_method": "response_distillation",
                    "task": "classification",
                    "attempt": 1,
                    "created_at": "2026-11-29T03:08:02Z",
                    "queued_at": "2026-11-29T03:08:02Z",
                    "started_at": "2026-11-29T03:08:03Z",
                    "finished_at": None,
                    "error": None,
                }
            ]
        }
    )

    job_id: str
    name: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    status: str
    progress: float = Field(ge=0, le=100)
    phase: str | None
    teacher_model_name: str
    target_compression: float | None
    distillation_method: str | None
    task: str | None
    attempt: int
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None


_RUNNING_JOB_EXAMPLE: dict[str, Any] = {
    "job_id": "5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11",
    "status": "running",
    "progress": 42.5,
    "phase": "distill",
    "estimated_completion": "2026-11-29T03:12:40Z",
    "eta_seconds": 95.0,
    "created_at": "2026-11-29T03:08:02Z",
    "updated_at": "2026-11-29T03:11:05Z",
    "queued_at": "2026-11-29T03:08:02Z",
    "dispatched_at": "2026-11-29T03:08:03Z",
    "started_at": "2026-11-29T03:08:03Z",
    "finished_at": None,
    "heartbeat_at": "2026-11-29T03:11:05Z",
    "attempt": 1,
    "teacher_model_name": "digits-cnn",
    "spec": {k: v for k, v in DIGITS_JOB_EXAMPLE.items() if k != "auto_start"},
    "metrics": {"stage": 1, "epoch": 4, "student_accuracy": 0.9417, "total_loss": 0.512},
    "results": None,
    "error": None,
}


# Measured: DIGITS_JOB_EXAMPLE run with `distillery run` on a 2-core CPU, as the engine reported it.
_COMPLETED_RESULTS_EXAMPLE: dict[str, Any] = {
    "task": "classification",
    "metric": "accuracy",
    "device": "cpu",
    "teacher_accuracy": 0.9889,
    "initial_student_accuracy": 0.1,
    "final_student_accuracy": 0.9278,
    "best_student_accuracy": 0.9278,
    "accuracy_retention": 0.9382,
    "original_parameters": 846826,
    "compressed_parameters": 210926,
    "compression_ratio": 0.2491,
    "target_compression": 0.25,
    "parameter_reduction": 0.7509,
    "model_size_mb": {"teacher": 3.2304, "student": 0.8046},
    "memory_savings": 0.7509,
    "latency_ms": {
        "teacher": {"batch_1": 0.3142, "batch_64": 12.833},
        "student": {"batch_1": 0.0877, "batch_64": 6.9578},
    },
    "inference_speedup": 1.8444,
    "cost_savings": 0.4578,
    "training_history": [
        {
            "stage": 1,
            "epoch": 1,
            "student_accuracy": 0.6806,
            "distillation_loss": 24.8601,
            "student_loss": 1.8756,
            "total_loss": 17.9647,
            "seconds": 0.4296,
        },
        {
            "stage": 1,
            "epoch": 2,
            "student_accuracy": 0.7917,
            "distillation_loss": 18.3071,
            "student_loss": 0.8717,
            "total_loss": 13.0765,
            "seconds": 0.5607,
        },
        {
            "stage": 1,
            "epoch": 3,
            "student_accuracy": 0.8264,
            "distillation_loss": 9.9769,
            "student_loss": 0.4306,
            "total_loss": 7.113,
            "seconds": 0.4284,
        },
        {
            "stage": 1,
            "epoch": 4,
            "student_accuracy": 0.8819,
            "distillation_loss": 5.0807,
            "student_loss": 0.3139,
            "total_loss": 3.6507,
            "seconds": 0.3111,
        },
        {
            "stage": 1,
            "epoch": 5,
            "student_accuracy": 0.9097,
            "distillation_loss": 3.1293,
            "student_loss": 0.2544,
            "total_loss": 2.2668,
            "seconds": 0.2907,
        },
        {
            "stage": 1,
            "epoch": 6,
            "student_accuracy": 0.9097,
            "distillation_loss": 2.4712,
            "student_loss": 0.2116,
            "total_loss": 1.7933,
            "seconds": 0.3528,
        },
        {
            "stage": 1,
            "epoch": 7,
            "student_accuracy": 0.9028,
            "distillation_loss": 2.0741,
            "student_loss": 0.1809,
            "total_loss": 1.5061,
            "seconds": 0.4891,
        },
        {
            "stage": 1,
            "epoch": 8,
            "student_accuracy": 0.9236,
            "distillation_loss": 1.9394,
            "student_loss": 0.1764,
            "total_loss": 1.4105,
            "seconds": 0.3595,
        },
        {
            "stage": 1,
            "epoch": 9,
            "student_accuracy": 0.9167,
            "distillation_loss": 1.8206,
            "student_loss": 0.1569,
            "total_loss": 1.3215,
            "seconds": 0.3274,
        },
        {
            "stage": 1,
            "epoch": 10,
            "student_accuracy": 0.9167,
            "distillation_loss": 1.8133,
            "student_loss": 0.1563,
            "total_loss": 1.3162,
            "seconds": 0.3135,
        },
    ],
    "stages": [
        {
            "stage": 1,
            "compression_ratio": 0.2491,
            "parameters": 210926,
            "best_student_accuracy": 0.9278,
            "temperature": 4.0,
            "alpha": 0.7,
        }
    ],
    "baseline_accuracy": 0.9556,
    "kd_gain": -2.7778,
    "teacher_cache_used": True,
    "training_seconds": 7.535,
    "total_seconds": 20.1921,
    "compression_stages": [],
}

_COMPLETED_JOB_EXAMPLE: dict[str, Any] = {
    **_RUNNING_JOB_EXAMPLE,
    "status": "completed",
    "progress": 100.0,
    "phase": "done",
    "estimated_completion": None,
    "eta_seconds": 0.0,
    "updated_at": "2026-11-29T03:08:24Z",
    "finished_at": "2026-11-29T03:08:24Z",
    "heartbeat_at": "2026-11-29T03:08:24Z",
    "metrics": {"stage": 1, "epoch": 10, "student_accuracy": 0.9167, "total_loss": 1.3162},
    "results": _COMPLETED_RESULTS_EXAMPLE,
}


class JobLineage(BaseModel):
    """Where a job started from."""

    job_id: str
    checkpoint: str


class JobRead(BaseModel):
    """One job: state, progress and ETA, timestamps, the spec, the latest metrics, results or error."""

    model_config = ConfigDict(json_schema_extra={"examples": [_RUNNING_JOB_EXAMPLE, _COMPLETED_JOB_EXAMPLE]})

    job_id: str
    name: str | None = Field(default=None, description="Your name for the job")
    metadata: dict[str, str] = Field(default_factory=dict, description="Your string pairs")
    status: str = Field(
        description="pending | queued | dispatched | running | pausing | paused | cancelling | completed | "
        "failed | cancelled"
    )
    progress: float = Field(ge=0, le=100, description="Percent of the whole job, 0-100")
    phase: str | None = Field(description="What the worker is doing: teacher, distill, evaluate, ...")
    estimated_completion: datetime | None = Field(description="now + eta_seconds, while running")
    eta_seconds: float | None
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempt: int = Field(description="Claims so far (1 on the first run; more after a worker died)")
    teacher_model_name: str
    spec: dict[str, Any]
    metrics: dict[str, Any] | None = Field(description="The latest metrics the worker reported")
    results: dict[str, Any] | None = Field(description="DistillationResults once completed")
    error: JobError | None = Field(description="{code, message} once failed")
    queue_reason: str | None = Field(
        default=None,
        description="Why a queued job is not admitted yet, when it asks for more devices "
        "(training_config.world_size) than any live worker offers; null otherwise",
    )
    estimate: dict[str, Any] | None = Field(
        default=None, description="The estimate made at create (POST /distillation/jobs/estimate)"
    )
    parent: JobLineage | None = Field(
        default=None, description="The job and checkpoint this one started from (from_checkpoint)"
    )


class JobEventRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 57,
                    "job_id": "5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11",
                    "created_at": "2026-11-29T03:08:05Z",
                    "kind": "metric",
                    "attempt": 1,
                    "message": "distill stage 1 epoch 4/10: val accuracy 0.9417",
                    "data": {
                        "phase": "distill",
                        "stage": 1,
                        "epoch": 4,
                        "student_accuracy": 0.9417,
                        "distillation_loss": 0.731,
                        "student_loss": 0.214,
                        "total_loss": 0.576,
                        "seconds": 0.41,
                    },
                },
                {
                    "id": 41,
                    "job_id": "5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11",
                    "created_at": "2026-11-29T03:08:03Z",
                    "kind": "state",
                    "attempt": 1,
                    "message": "dispatched -> running",
                    "data": {"from": "dispatched", "to": "running", "worker": "worker-gpu0@host"},
                },
            ]
        }
    )

    id: int
    job_id: str
    created_at: datetime
    kind: str = Field(description="state | progress | metric | claim | log")
    attempt: int
    message: str
    data: dict[str, Any]


class ArtifactRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "student.safetensors",
                    "size_bytes": 168904,
                    "sha256": "3c9a0f5e2b8d4c7a1e6f0b9d8c7a6e5f4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a",
                    "media_type": "application/octet-stream",
                    "created_at": "2026-11-29T03:10:41Z",
                    "url": "/distillation/jobs/5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11/artifacts/"
                    "student.safetensors",
                }
            ]
        }
    )

    name: str
    size_bytes: int
    sha256: str
    media_type: str
    created_at: datetime
    url: str = Field(description="Where to download it")
