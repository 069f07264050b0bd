"""The webhooks resource: a tenant's endpoints for job events (the deliveries are sent by the scheduler)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import CheckedQueryRoute, CurrentTenantDep, SessionDep, SettingsDep
from app.models import WebhookEndpoint
from app.schemas.problem import problem_responses
from app.schemas.webhooks import (
    WebhookEndpointCreate,
    WebhookEndpointRead,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
)
from app.services import webhooks as webhooks_service

router = APIRouter(prefix="/distillation/webhooks", tags=["webhooks"], route_class=CheckedQueryRoute)

EndpointId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


def _read(endpoint: WebhookEndpoint) -> WebhookEndpointRead:
    return WebhookEndpointRead.model_validate(endpoint, from_attributes=True)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookEndpointWithSecret,
    summary="Register a webhook endpoint",
    description="Job events (`job.completed`, `job.failed`, `job.cancelled`, `job.paused`) are POSTed to "
    "`url`, signed as the Standard Webhooks specification says (`webhook-id`, `webhook-timestamp`, "
    "`webhook-signature: v1,<base64 HMAC-SHA256>` keyed with the base64 part of the `whsec_` secret, "
    "which is shown only in this response). Retried with exponential backoff for WEBHOOK_RETRY_HOURS "
    "until a 2xx answer. URLs resolving to private, loopback or link-local addresses answer 422 unless "
    "WEBHOOK_ALLOW_PRIVATE_NETWORKS=true.",
    responses=problem_responses(401, 409, 422, 503),
)
def create_endpoint(
    request: WebhookEndpointCreate, session: SessionDep, settings: SettingsDep, tenant: CurrentTenantDep
) -> WebhookEndpointWithSecret:
    endpoint = webhooks_service.create_endpoint(
        session,
        tenant_id=tenant.tenant_id,
        url=request.url,
        events=list(request.events),
        description=request.description,
        settings=settings,
    )
    return WebhookEndpointWithSecret.model_validate(endpoint, from_attributes=True)


@router.get(
    "",
    response_model=list[WebhookEndpointRead],
    summary="Your webhook endpoints",
    responses=problem_responses(401, 503),
)
def list_endpoints(session: SessionDep, tenant: CurrentTenantDep) -> list[WebhookEndpointRead]:
    return [_read(e) for e in webhooks_service.list_endpoints(session, tenant_id=tenant.tenant_id)]


@router.get(
    "/{endpoint_id}",
    response_model=WebhookEndpointRead,
    summary="One webhook endpoint",
    responses=problem_responses(401, 404, 422, 503),
)
def get_endpoint(
    endpoint_id: EndpointId, session: SessionDep, tenant: CurrentTenantDep
) -> WebhookEndpointRead:
    return _read(
        webhooks_service.get_endpoint_or_raise(session, endpoint_id=endpoint_id, tenant_id=tenant.tenant_id)
    )


@router.patch(
    "/{endpoint_id}",
    response_model=WebhookEndpointRead,
    summary="Change an endpoint's url, events, description or enabled",
    responses=problem_responses(401, 404, 422, 503),
)
def update_endpoint(
    endpoint_id: EndpointId,
    request: WebhookEndpointUpdate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenantDep,
) -> WebhookEndpointRead:
    changes = {k: v for k, v in request.model_dump(exclude_unset=True).items() if v is not None}
    endpoint = webhooks_service.update_endpoint(
        session, endpoint_id=endpoint_id, tenant_id=tenant.tenant_id, changes=changes, settings=settings
    )
    return _read(endpoint)


@router.post(
    "/{endpoint_id}/rotate-secret",
    response_model=WebhookEndpointWithSecret,
    summary="Replace an endpoint's secret (shown once)",
    responses=problem_responses(401, 404, 422, 503),
)
def rotate_secret(
    endpoint_id: EndpointId, session: SessionDep, tenant: CurrentTenantDep
) -> WebhookEndpointWithSecret:
    endpoint = webhooks_service.rotate_secret(session, endpoint_id=endpoint_id, tenant_id=tenant.tenant_id)
    return WebhookEndpointWithSecret.model_validate(endpoint, from_attributes=True)


@router.delete(
    "/{endpoint_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an endpoint (its pending deliveries are dropped)",
    responses=problem_responses(401, 404, 422, 503),
)
def delete_endpoint(endpoint_id: EndpointId, session: SessionDep, tenant: CurrentTenantDep) -> Response:
    webhooks_service.delete_endpoint(session, endpoint_id=endpoint_id, tenant_id=tenant.tenant_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
