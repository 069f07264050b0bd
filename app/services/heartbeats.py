"""Liveness of the scheduler and worker processes in `service_heartbeats`, read by /health."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.models import ServiceHeartbeat, utcnow


def service_id(kind: str, *, name: str | None = None) -> str:
    """A stable id for this process: `kind:host:pid` (or `kind:name` when the process has a name)."""
    return f"{kind}:{name}" if name else f"{kind}:{socket.gethostname()}:{os.getpid()}"


def beat(session: Session, *, kind: str, sid: str, info: dict[str, Any] | None = None) -> None:
    """Insert or refresh this process's heartbeat row (each process only writes its own row)."""
    now = utcnow()
    row = session.get(ServiceHeartbeat, sid)
    if row is None:
        session.add(
            ServiceHeartbeat(
                id=sid,
                kind=kind,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                started_at=now,
                last_seen_at=now,
                info=info or {},
            )
        )
    else:
        row.last_seen_at = now
        if info is not None:
            row.info = info
    session.flush()


def remove(session: Session, *, sid: str) -> None:
    """Forget a process that shuts down cleanly."""
    session.execute(delete(ServiceHeartbeat).where(ServiceHeartbeat.id == sid))


def list_alive(session: Session, *, kind: str, within_seconds: float) -> list[ServiceHeartbeat]:
    """Processes of `kind` seen within the last `within_seconds`."""
    cutoff = utcnow() - timedelta(seconds=within_seconds)
    stmt = (
        select(ServiceHeartbeat)
        .where(ServiceHeartbeat.kind == kind, ServiceHeartbeat.last_seen_at >= cutoff)
        .order_by(ServiceHeartbeat.id)
    )
    return list(session.scalars(stmt))


def offered_devices() -> ColumnElement[int]:
    """SQL: the devices a worker's heartbeat says it offers one job (`info.devices`; 1 before it said)."""
    return func.coalesce(ServiceHeartbeat.info["devices"].as_integer(), 1)


def max_live_devices(session: Session, *, within_seconds: float) -> int:
    """The most devices any live worker offers one job: the largest world_size that can run now (0: none)."""
    cutoff = utcnow() - timedelta(seconds=within_seconds)
    value = session.scalar(
        select(func.max(offered_devices())).where(
            ServiceHeartbeat.kind == "worker", ServiceHeartbeat.last_seen_at >= cutoff
        )
    )
    return int(value or 0)
