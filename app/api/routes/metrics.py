"""Prometheus exposition: jobs, queue, admission wait, durations, heartbeats, HTTP latency."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.schemas.problem import Problem

router = APIRouter(tags=["metrics"])

_EXAMPLE = """# HELP distillery_jobs Jobs in the database by status
# TYPE distillery_jobs gauge
distillery_jobs{status="running"} 2.0
distillery_queue_depth 3.0
distillery_admission_wait_seconds_bucket{le="0.5"} 41.0
distillery_http_request_duration_seconds_count{method="GET",route="/distillation/jobs",status="200"} 97.0
"""


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Jobs by status, queue depth and the oldest queued job's wait, admission wait and job "
    "duration histograms (from stored timestamps), scheduler/worker heartbeat ages, HTTP latency by route "
    "template, process figures. Prometheus text format; public, like /health.",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}, "example": _EXAMPLE}}},
        500: {
            "model": Problem,
            "description": "Unexpected error (an unreachable database is not one: it reads as "
            "distillery_database_up 0)",
            "content": {"application/problem+json": {}},
        },
    },
)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
