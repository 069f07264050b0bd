"""Liveness and readiness: database, broker, scheduler, workers, job counts."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CheckedQueryRoute, SessionDep, SettingsDep
from app.schemas.health import HealthRead
from app.schemas.problem import problem_responses
from app.services import health as health_service

router = APIRouter(tags=["health"], route_class=CheckedQueryRoute)


@router.get(
    "/health",
    response_model=HealthRead,
    summary="Service health",
    description="200 while the database answers (`status: degraded` if the broker, scheduler or every "
    "worker is down); 503 problem+json when the database is unreachable.",
    responses=problem_responses(503),
)
def get_health(session: SessionDep, settings: SettingsDep) -> HealthRead:
    return health_service.health(session, settings=settings)
