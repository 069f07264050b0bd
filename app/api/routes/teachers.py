"""The teacher registry: list, read, register a local directory or a hub id."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import CheckedQueryRoute, CurrentTenantDep, SessionDep, SettingsDep
from app.schemas.problem import problem_responses
from app.schemas.teachers_api import TeacherCreate, TeacherRead
from app.services import file_roots
from app.services import teachers as teachers_service

router = APIRouter(prefix="/distillation/teachers", tags=["teachers"], route_class=CheckedQueryRoute)


@router.get(
    "",
    response_model=list[TeacherRead],
    summary="Teachers you can use: the default registry plus your registrations",
    responses=problem_responses(401, 503),
)
def list_teachers(session: SessionDep, settings: SettingsDep, tenant: CurrentTenantDep) -> list[TeacherRead]:
    root = file_roots.root_for(session, settings=settings, tenant_id=tenant.tenant_id)
    return [
        teachers_service.to_read(t, file_root=root)
        for t in teachers_service.list_all(session, tenant_id=tenant.tenant_id)
    ]


@router.get(
    "/{name}",
    response_model=TeacherRead,
    summary="One teacher",
    responses=problem_responses(401, 404, 422, 503),
)
def get_teacher(
    name: Annotated[str, Path(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")],
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
) -> TeacherRead:
    teacher = teachers_service.get_or_raise(session, name=name, tenant_id=tenant.tenant_id)
    root = file_roots.root_for(session, settings=settings, tenant_id=tenant.tenant_id)
    return teachers_service.to_read(teacher, file_root=root)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TeacherRead,
    summary="Register a teacher: a local directory (with config.json) or a Hugging Face hub id",
    description="Local directories are taken relative to the file root (ALLOWED_FILE_ROOT, or "
    "ALLOWED_FILE_ROOT/<tenant>/ with ALLOWED_FILE_ROOT_PER_TENANT), symlinks resolved, and refused with a "
    "422 when no root is configured. "
    "Hub ids are checked for form only; this service cannot reach the network, so they are reported with "
    "`available_offline: false`.",
    responses=problem_responses(401, 409, 422, 503),
)
def register_teacher(
    request: TeacherCreate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
    response: Response,
) -> TeacherRead:
    teacher = teachers_service.register(
        session, request=request, settings=settings, tenant_id=tenant.tenant_id
    )
    response.headers["Location"] = f"/distillation/teachers/{teacher.name}"
    root = file_roots.root_for(session, settings=settings, tenant_id=tenant.tenant_id)
    return teachers_service.to_read(teacher, file_root=root)
