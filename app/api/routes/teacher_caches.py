"""Teacher-signal caches of the caller's tenant: list, read, delete (they are created by jobs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import CheckedQueryRoute, CurrentTenantDep, SettingsDep
from app.schemas.problem import problem_responses
from app.schemas.teacher_caches import TeacherCachePage, TeacherCacheRead
from app.services import teacher_caches as caches_service

router = APIRouter(
    prefix="/distillation/teacher-caches", tags=["teacher-caches"], route_class=CheckedQueryRoute
)

_Key = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The cache key (32 hex digits)")]


@router.get(
    "",
    response_model=TeacherCachePage,
    summary="Your teacher-signal caches, most recently used first",
    description="Each is the top-k teacher logits of one tokenised train split, written by a language-model "
    "job and reused by later jobs of yours with the same teacher weights, data, max_seq_length and k.",
    responses=problem_responses(401),
)
def list_caches(settings: SettingsDep, tenant: CurrentTenantDep) -> TeacherCachePage:
    found = caches_service.entries(settings.data_dir, owner=tenant.tenant_id)
    return TeacherCachePage(
        items=[TeacherCacheRead.model_validate(caches_service.to_read(e)) for e in found],
        total_bytes=sum(e.bytes for e in found),
        max_bytes=settings.teacher_signal_cache_max_bytes,
    )


@router.get(
    "/{key}", response_model=TeacherCacheRead, summary="One cache", responses=problem_responses(401, 404, 422)
)
def get_cache(key: _Key, settings: SettingsDep, tenant: CurrentTenantDep) -> TeacherCacheRead:
    entry = caches_service.get_or_raise(settings.data_dir, owner=tenant.tenant_id, key=key)
    return TeacherCacheRead.model_validate(caches_service.to_read(entry))


@router.delete(
    "/{key}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a cache (a job using it keeps its in-memory copy; later jobs rebuild it)",
    responses=problem_responses(401, 404, 422),
)
def delete_cache(key: _Key, settings: SettingsDep, tenant: CurrentTenantDep) -> Response:
    caches_service.delete(settings.data_dir, owner=tenant.tenant_id, key=key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
