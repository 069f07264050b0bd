"""Kept checkpoints as a resource: the worker records them (lease-guarded), the API lists and serves them,
and a new job may start from one of the same tenant (`from_checkpoint`), copied into its own folder at
create so the fork does not depend on the parent's files staying."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import NotFound, Unprocessable
from app.models import Job, JobCheckpoint, JobStatus, utcnow
from app.schemas.job_spec import DistillationMethod, JobSpec
from app.schemas.jobs import FromCheckpoint

# Where a fork's starting weights are copied, inside the new job's folder.
PARENT_WEIGHTS = "parent.student.safetensors"
_HELD = (JobStatus.running, JobStatus.cancelling, JobStatus.pausing)


def _held(session: Session, job_id: str, lease_token: str) -> bool:
    """Lock the job row while `lease_token` holds it (as record_event_if_held does)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == lease_token, Job.status.in_(_HELD))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return int(result.rowcount) == 1


def record_kept(session: Session, *, job_id: str, lease_token: str, data: dict[str, Any]) -> bool:
    """Insert or replace the row of a kept checkpoint the engine announced; False once the lease is gone."""
    if not _held(session, job_id, lease_token):
        return False
    name = str(data["kept"])
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.name == name))
    weights = str(data["weights_path"])
    session.add(
        JobCheckpoint(
            job_id=job_id,
            name=name,
            kind=str(data.get("kind", "epoch")),
            run_kind=str(data.get("run_kind", "distill")),
            stage=int(data.get("stage", 1)),
            epoch=int(data["epoch"]),
            metric_name=str(data.get("metric_name", "")),
            metric_value=data.get("metric_value"),
            path=weights,
            weights_path=weights,
            size_bytes=int(data.get("bytes", 0)),
            created_at=utcnow(),
        )
    )
    return True


def record_removed(session: Session, *, job_id: str, lease_token: str, name: str) -> bool:
    if not _held(session, job_id, lease_token):
        return False
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.name == name))
    return True


def list_for_job(session: Session, *, job_id: str) -> list[JobCheckpoint]:
    """Kept checkpoints: last and best first, then the epochs in order."""
    rows = list(session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)))
    order = {"last": 0, "best": 1}
    return sorted(rows, key=lambda r: (order.get(r.kind, 2), r.stage, r.epoch, r.name))


def get_file(session: Session, *, job_id: str, name: str, settings: Settings) -> tuple[JobCheckpoint, Path]:
    """The row and the weights file of one kept checkpoint, checked to lie in the job's folder."""
    row = session.scalar(
        select(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.name == name)
    )
    if row is None:
        names = [r.name for r in list_for_job(session, job_id=job_id)]
        raise NotFound(
            f"Job {job_id} has no checkpoint '{name}'; kept checkpoints: {', '.join(names) or '(none)'}.",
            checkpoints=names,
        )
    path = Path(row.weights_path).resolve()
    job_dir = (settings.jobs_dir / job_id).resolve()
    if not path.is_relative_to(job_dir) or not path.is_file():
        raise NotFound(
            f"The file of checkpoint '{name}' of job {job_id} is not on disk (yet); retry shortly."
        )
    return row, path


def _error(field: list[str], message: str, kind: str) -> Unprocessable:
    return Unprocessable(
        f"{'.'.join(field)}: {message}",
        errors=[{"loc": ["body", *field], "field": ".".join(field), "msg": message, "type": kind}],
    )


def resolve_parent(
    session: Session, *, source: FromCheckpoint, spec: JobSpec, tenant_id: str | None
) -> JobCheckpoint:
    """The kept checkpoint a new job starts from, checked: same tenant, compatible spec, epochs to train."""
    parent = session.get(Job, source.job_id)
    if parent is None or (tenant_id is not None and parent.tenant_id != tenant_id):
        raise _error(["from_checkpoint", "job_id"], f"no job with id '{source.job_id}'", "unknown_job")
    row = session.scalar(
        select(JobCheckpoint).where(
            JobCheckpoint.job_id == parent.id, JobCheckpoint.name == source.checkpoint
        )
    )
    if row is None:
        names = [r.name for r in list_for_job(session, job_id=parent.id)]
        raise _error(
            ["from_checkpoint", "checkpoint"],
            f"job {parent.id} has no checkpoint '{source.checkpoint}'; kept: {', '.join(names) or '(none)'}",
            "unknown_checkpoint",
        )
    parent_spec = dict(parent.spec or {})
    # The parent's spec as this version reads it (fields added since then get their defaults).
    with contextlib.suppress(ValidationError):
        parent_spec = JobSpec.model_validate(parent_spec).model_dump(mode="json")
    for key in ("teacher_model_name", "target_compression", "student", "task"):
        mine = spec.model_dump(mode="json")[key]
        if parent_spec.get(key) != mine:
            raise _error(
                [key],
                f"must match the parent job's ({parent_spec.get(key)!r}, not {mine!r}): the checkpoint's "
                "student is built from it",
                "parent_mismatch",
            )
    config = spec.training_config
    if spec.distillation_method == DistillationMethod.progressive or config.baseline:
        raise _error(
            ["from_checkpoint"],
            "a job started from a checkpoint is one distillation stage: not progressive, no baseline",
            "fork_unsupported",
        )
    if getattr(spec, "target_retention", None) is not None or getattr(config, "seeds", None):
        raise _error(
            ["from_checkpoint"],
            "a job started from a checkpoint trains one student: no target_retention search, no seeds",
            "fork_unsupported",
        )
    if (
        row.run_kind != "distill"
        or row.stage != 1
        or parent_spec.get("distillation_method") == "progressive_distillation"
    ):
        raise _error(
            ["from_checkpoint", "checkpoint"],
            "only checkpoints of single-stage distillation jobs can be started from",
            "fork_unsupported",
        )
    if config.epochs <= row.epoch:
        raise _error(
            ["training_config", "epochs"],
            f"the checkpoint is at epoch {row.epoch}; epochs must be larger (only the epochs after it train)",
            "nothing_to_train",
        )
    if not Path(row.weights_path).is_file():
        raise _error(["from_checkpoint", "checkpoint"], "its file is no longer on disk", "checkpoint_missing")
    return row


def copy_parent_weights(row: JobCheckpoint, *, job_id: str, settings: Settings) -> Path:
    """Copy the parent's weights into the new job's folder (the fork then needs nothing of the parent)."""
    target = settings.jobs_dir / job_id / PARENT_WEIGHTS
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(row.weights_path, target)
    return target
