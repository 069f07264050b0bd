"""Server paths a tenant may name (`file` datasets, local teacher directories): only under its file root.

The root is ALLOWED_FILE_ROOT (or ALLOWED_FILE_ROOT/<tenant name>/ in the per-tenant layout); with none
configured, server paths are refused and uploads are the way in. DATA_DIR is never a root (Settings refuses
it), so one tenant can never name another's uploads, artifacts or checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.paths import PathKind, PathRefused, resolve_path
from app.models import Tenant

FILES_DISABLED_CODE = "files_disabled"


FILES_DISABLED_MESSAGE = (
    "paths on the server's disks (`file` datasets, local teacher directories) are off on this server: an "
    "operator enables them by setting ALLOWED_FILE_ROOT to a folder outside DATA_DIR (README, Settings). "
    "Upload data with POST /distillation/datasets instead."
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
