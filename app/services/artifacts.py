"""A job's artifacts (rows written by the worker): list them and find one's file for download."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import NotFound
from app.models import Artifact
from app.schemas.jobs import ArtifactRead


def list_for_job(session: Session, *, job_id: str) -> list[Artifact]:
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all()
    )


def get_file(session: Session, *, job_id: str, name: str, settings: Settings) -> tuple[Artifact, Path]:
    """The artifact row and its file; NotFound if either is missing or the file is outside the jobs folder."""
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        names = [a.name for a in list_for_job(session, job_id=job_id)]
        raise NotFound(
            f"Job {job_id} has no artifact '{name}'. Artifacts: {', '.join(names) or '(none yet)'}.",
            artifacts=names,
        )
    path = Path(artifact.path)
    if not path.is_absolute():
        path = settings.jobs_dir / job_id / path
    path = path.resolve()
    if not path.is_relative_to(settings.jobs_dir.resolve()) or not path.is_file():
        raise NotFound(f"The file of artifact '{name}' of job {job_id} is missing.")
    return artifact, path


def to_read(artifact: Artifact) -> ArtifactRead:
    return ArtifactRead(
        name=artifact.name,
        size_bytes=artifact.size_bytes,
        sha256=artifact.sha256,
        media_type=artifact.media_type,
        created_at=artifact.created_at,
        url=f"/distillation/jobs/{artifact.job_id}/artifacts/{artifact.name}",
    )
