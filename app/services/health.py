"""Health checks: database, broker, scheduler and worker liveness (from service_heartbeats), job counts."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ACTIVE_STATUSES, Job, ServiceHeartbeat, utcnow
from app.schemas.health import ComponentHealth, HealthRead, WorkersHealth

_BROKER_TIMEOUT_SECONDS = 1.0


def check_database(session: Session) -> None:
    """SELECT 1; raises sqlalchemy's OperationalError when the database is unreachable."""
    session.execute(text("SELECT 1"))


def check_broker(settings: Settings) -> ComponentHealth:
    """Redis: PING. Filesystem broker: its queue folder exists and is writable."""
    if settings.is_embedded_broker:
        folder = Path(str(settings.broker_transport_options["data_folder_in"]))
        if folder.is_dir() and os.access(folder, os.W_OK):
            return ComponentHealth(status="ok", detail=f"filesystem broker at {folder}")
        return ComponentHealth(status="down", detail=f"broker folder {folder} is missing or not writable")
    url = settings.resolved_broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return ComponentHealth(status="unknown", detail=f"no check for broker scheme {url.split(':', 1)[0]}")
    client = redis.Redis.from_url(
        url, socket_timeout=_BROKER_TIMEOUT_SECONDS, socket_connect_timeout=_BROKER_TIMEOUT_SECONDS
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return ComponentHealth(status="down", detail=f"redis PING failed: {exc}")
    finally:
        client.close()
    return ComponentHealth(status="ok", detail="redis PING answered")


def _scheduler_health(session: Session, settings: Settings) -> ComponentHealth:
    window = max(3 * settings.tick_seconds, 1.0)
    last = session.scalar(
        select(func.max(ServiceHeartbeat.last_seen_at)).where(ServiceHeartbeat.kind == "scheduler")
    )
    if last is None:
        return ComponentHealth(status="down", detail="no scheduler has reported")
    if last < utcnow() - timedelta(seconds=window):
        return ComponentHealth(status="down", detail=f"the scheduler last beat at {last.isoformat()}")
    return ComponentHealth(status="ok", detail=f"last beat at {last.isoformat()}")


def _workers_health(session: Session, settings: Settings) -> WorkersHealth:
    since = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    alive = (
        session.scalar(
            select(func.count())
            .select_from(ServiceHeartbeat)
            .where(ServiceHeartbeat.kind == "worker", ServiceHeartbeat.last_seen_at >= since)
        )
        or 0
    )
    if alive == 0:
        return WorkersHealth(status="down", detail="no worker beat within HEARTBEAT_TIMEOUT", alive=0)
    return WorkersHealth(status="ok", detail=f"{alive} worker(s) alive", alive=alive)


def health(session: Session, *, settings: Settings) -> HealthRead:
    """Every check; the database one raises (the API answers 503), the others report `down`."""
    check_database(session)
    broker = check_broker(settings)
    scheduler = _scheduler_health(session, settings)
    workers = _workers_health(session, settings)
    active = (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.status.in_([s.value for s in ACTIVE_STATUSES]))
        )
        or 0
    )
    total = session.scalar(select(func.count()).select_from(Job)) or 0
    healthy = all(part.status == "ok" for part in (broker, scheduler, workers))
    return HealthRead(
        status="ok" if healthy else "degraded",
        database=ComponentHealth(status="ok", detail="SELECT 1 answered"),
        broker=broker,
        scheduler=scheduler,
        workers=workers,
        active_jobs=active,
        total_jobs=total,
    )
