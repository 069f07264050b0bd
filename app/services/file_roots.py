"""Server paths a tenant may name (`file` datasets, local teacher directories): only under its file root.

The root is ALLOWED_FILE_ROOT (or ALLOWED_FILE_ROOT/<tenant name>/ in the per-tenant layout); with none
configured, server paths are refused and uploads are the way in. DATA_DIR is never a root (Settings refuses
it), so one tenant can never name another's uploads, artifacts or checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, true
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.paths import PathKind, PathRefused, resolve_path
from app.models import Dataset, Teacher, Tenant
from app.schemas.job_spec import (
    FileDataset,
    FileSource,
    JobSpec,
    LocalStudent,
    RegistryStudent,
    UploadedSource,
)

FILES_DISABLED_CODE = "files_disabled"


FILES_DISABLED_MESSAGE = (
    "paths on the server's disks (`file` datasets, local teacher and student directories) are off on this "
    "server: an operator enables them by setting ALLOWED_FILE_ROOT to a folder outside DATA_DIR (README, "
    "Settings). Upload data with POST /distillation/datasets instead."
)


def tenant_name(session: Session, tenant_id: str | None) -> str | None:
    if tenant_id is None:
        return None
    tenant = session.get(Tenant, tenant_id)
    return tenant.name if tenant is not None else None


def root_for(session: Session, *, settings: Settings, tenant_id: str | None) -> Path | None:
    """The tenant's file root, or None when server paths are off (or the tenant has no folder)."""
    if settings.file_root is None:
        return None
    name = tenant_name(session, tenant_id) if settings.allowed_file_root_per_tenant else None
    return settings.file_root_for(name)


def resolve_for_tenant(
    session: Session, *, settings: Settings, tenant_id: str | None, text: str, kind: PathKind, what: str
) -> tuple[Path, Path]:
    """(resolved path, root) for a path the tenant named; PathRefused (code files_disabled, path_*) else."""
    root = root_for(session, settings=settings, tenant_id=tenant_id)
    if root is None:
        raise PathRefused(FILES_DISABLED_CODE, f"{what}: {FILES_DISABLED_MESSAGE}")
    return resolve_path(text, root=root, kind=kind, what=what), root


def stored_form(resolved: Path, root: Path) -> str:
    """How a checked path is stored and shown: relative to the tenant's root (never the absolute path)."""
    return resolved.relative_to(root.resolve()).as_posix()


def _field_error(loc: list[str], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "field": ".".join(loc), "msg": msg, "type": kind}


def check_spec_sources(
    session: Session, *, spec: JobSpec, settings: Settings, tenant_id: str | None
) -> tuple[JobSpec, list[dict[str, Any]]]:
    """Every server path a spec names, checked under the tenant's root and stored relative to it.

    The `file` dataset and its held-out `validation` / `test` files, a `local` student directory; held-out
    uploads must be the tenant's own, and a `registry` student one the tenant may use (its files are the
    owner's). Returns the spec to store and the field errors (the caller reports them with its own).
    """
    errors: list[dict[str, Any]] = []

    def checked(text: str, loc: list[str], kind: PathKind, what: str) -> str | None:
        try:
            resolved, root = resolve_for_tenant(
                session, settings=settings, tenant_id=tenant_id, text=text, kind=kind, what=what
            )
        except PathRefused as exc:
            errors.append(_field_error(loc, exc.message, exc.code))
            return None
        return stored_form(resolved, root)

    dataset = spec.dataset_config
    updates: dict[str, Any] = {}
    if isinstance(dataset, FileDataset):
        stored = checked(dataset.path, ["dataset_config", "path"], PathKind.any, "Dataset path")
        updates["path"] = stored or dataset.path
    for split in ("validation", "test"):
        source = getattr(dataset, split, None)
        if isinstance(source, FileSource):
            loc = ["dataset_config", split, "path"]
            stored = checked(source.path, loc, PathKind.any, f"The {split} dataset path")
            updates[split] = source.model_copy(update={"path": stored or source.path})
        elif isinstance(source, UploadedSource):
            owned = session.get(Dataset, source.dataset_id)
            if owned is None or (tenant_id is not None and owned.tenant_id != tenant_id):
                errors.append(
                    _field_error(
                        ["dataset_config", split, "dataset_id"],
                        f"Unknown dataset '{source.dataset_id}'; GET /distillation/datasets lists yours",
                        "unknown_dataset",
                    )
                )
    spec_updates: dict[str, Any] = {"dataset_config": dataset.model_copy(update=updates)} if updates else {}
    student = spec.student
    if isinstance(student, LocalStudent):
        stored = checked(student.path, ["student", "path"], PathKind.directory, "Student directory")
        spec_updates["student"] = student.model_copy(update={"path": stored or student.path})
    elif isinstance(student, RegistryStudent):
        visible = session.scalar(
            select(Teacher.id).where(
                Teacher.name == student.name,
                or_(Teacher.tenant_id.is_(None), Teacher.tenant_id == tenant_id)
                if tenant_id is not None
                else true(),
            )
        )
        if visible is None:
            errors.append(
                _field_error(
                    ["student", "name"],
                    f"Unknown model '{student.name}'; GET /distillation/teachers lists the ones you can use",
                    "unknown_student",
                )
            )
    return (spec.model_copy(update=spec_updates) if spec_updates else spec), errors
