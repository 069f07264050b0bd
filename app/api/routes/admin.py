"""Admin API: issue, list and revoke tenant API keys. Guarded by ADMIN_API_KEY, not by tenant keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import AdminDep, CheckedQueryRoute, SessionDep
from app.models import ApiKey, Tenant
from app.schemas.admin import ApiKeyCreate, ApiKeyCreated, ApiKeyRead
from app.schemas.problem import problem_responses
from app.services import auth as auth_service

router = APIRouter(prefix="/admin", tags=["admin"], route_class=CheckedQueryRoute)


def _read(api_key: ApiKey, tenant: Tenant) -> ApiKeyRead:
    return ApiKeyRead(
        id=api_key.id,
        tenant=tenant.name,
        tenant_id=tenant.id,
        name=api_key.name,
        prefix=api_key.prefix,
        created_at=api_key.created_at,
        revoked_at=api_key.revoked_at,
    )


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    summary="Issue an API key for a tenant (the secret is shown once)",
    description="Needs `Authorization: Bearer <ADMIN_API_KEY>`. The tenant is created with its first key.",
    responses=problem_responses(401, 403, 422, 503),
)
def create_key(
    request: ApiKeyCreate, session: SessionDep, _admin: AdminDep, response: Response
) -> ApiKeyCreated:
    issued = auth_service.create_key(session, tenant_name=request.tenant, name=request.name)
    response.headers["Location"] = f"/admin/keys/{issued.record.id}"
    return ApiKeyCreated(**_read(issued.record, issued.tenant).model_dump(), key=issued.key)


@router.get(
    "/keys",
    response_model=list[ApiKeyRead],
    summary="Every API key (prefix only), newest first",
    responses=problem_responses(401, 403, 503),
)
def list_keys(session: SessionDep, _admin: AdminDep) -> list[ApiKeyRead]:
    return [_read(api_key, tenant) for api_key, tenant in auth_service.list_keys(session)]


@router.delete(
    "/keys/{key_id}",
    response_model=ApiKeyRead,
    summary="Revoke an API key (requests with it answer 401 from now on)",
    responses=problem_responses(401, 403, 404, 422, 503),
)
def revoke_key(
    key_id: Annotated[str, Path(min_length=1, max_length=36, pattern=r"^[A-Za-z0-9-]+$")],
    session: SessionDep,
    _admin: AdminDep,
) -> ApiKeyRead:
    api_key, tenant = auth_service.revoke_key(session, key_id=key_id)
    return _read(api_key, tenant)
