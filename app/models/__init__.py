"""SQLAlchemy 2 typed models on one DeclarativeBase; Alembic migrations create them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class JobStatus(StrEnum):
    pending = "pending"
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    cancelling = "cancelling"
    pausing = "pausing"
    paused = "paused"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


# Statuses holding an admission slot (pausing: the worker is still stopping at its next check).
ACTIVE_STATUSES = (JobStatus.dispatched, JobStatus.running, JobStatus.cancelling, JobStatus.pausing)
TERMINAL_STATUSES = (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class Teacher(Base):
    """A registered teacher. Names are unique per owner (`uq_teachers_owner_name`, migration 0007): a
    tenant's registration never collides with, nor reveals, another tenant's; global names are taken for all.
    """

    __tablename__ = "teachers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    source_kind: Mapped[str] = mapped_column(String(16))  # builtin | local | hub
    location: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(64))
    params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    task: Mapped[str | None] = mapped_column(String(64), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Owner (tenants.id); NULL for the seeded global teachers. Added by migration 0002.
    tenant_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# One name per owner; the global teachers (tenant_id NULL) are one owner, '' (never a tenant id) stands in.
Index("uq_teachers_owner_name", func.coalesce(Teacher.tenant_id, ""), Teacher.name, unique=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # csv | jsonl
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"names": [...], "num_labels": n}
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Owner (tenants.id). Added by migration 0002.
    tenant_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)


# Completed jobs whose estimate is history for the next ones (a partial index predicate, migration 0006).
ESTIMATE_HISTORY_WHERE = "status = 'completed' AND estimate IS NOT NULL"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    spec: Mapped[dict[str, Any]] = mapped_column()
    teacher_model_name: Mapped[str] = mapped_column(String(512), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.pending, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[str | None] = mapped_column(String(36), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0-100
    phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # latest
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {code, message}
    # Owner (tenants.id); NULL: created before tenants existed, visible to no tenant. Migration 0002;
    # indexed by the composite list indexes below (migration 0005).
    tenant_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # Migration 0004: a name and up to 16 string pairs set by the client, filterable in lists.
    name: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Completed pauses: `attempt - pause_count` is what counts against MAX_ATTEMPTS (a pause is no failure).
    pause_count: Mapped[int] = mapped_column(Integer, default=0)
    # The estimate made at create (app.services.estimates), compared with the actual in `results`.
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Lineage: the job and checkpoint this one started from (`from_checkpoint`); kept if the parent goes.
    parent_job_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    parent_checkpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    checkpoints: Mapped[list[JobCheckpoint]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        # Admission reads the queue in line order a page at a time (migration 0005).
        Index("ix_jobs_queue_order", "status", "queued_at", "id"),
        Index("ix_jobs_queue_by_tenant", "status", "tenant_id", "queued_at", "id"),
        # A tenant's newest jobs first, optionally by status or teacher: list pages without a sort.
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_tenant_status_created", "tenant_id", "status", "created_at", "id"),
        Index("ix_jobs_tenant_teacher_created", "tenant_id", "teacher_model_name", "created_at", "id"),
        # The estimate's history: the newest completed jobs that measured it (migration 0006).
        Index(
            "ix_jobs_estimate_history",
            "finished_at",
            postgresql_where=text(ESTIMATE_HISTORY_WHERE),
            sqlite_where=text(ESTIMATE_HISTORY_WHERE),
        ),
    )


class JobEvent(Base):
    """Append-only log of what happened to a job: state changes, progress, metrics, claims."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # state | progress | metric | claim | log
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)

    job: Mapped[Job] = relationship(back_populates="events")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")

    __table_args__ = (Index("uq_artifacts_job_name", "job_id", "name", unique=True),)


class JobCheckpoint(Base):
    """A kept checkpoint of a job (`last`, `best`, `epoch-N`): resumable state plus the student's weights."""

    __tablename__ = "job_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # last | best | epoch
    run_kind: Mapped[str] = mapped_column(String(16), default="distill")  # distill | baseline
    stage: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    metric_name: Mapped[str] = mapped_column(String(64))
    metric_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    path: Mapped[str] = mapped_column(Text)  # resumable state (engine format)
    weights_path: Mapped[str] = mapped_column(Text)  # student weights only (safetensors)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="checkpoints")

    __table_args__ = (Index("uq_job_checkpoints_job_name", "job_id", "name", unique=True),)


class ServiceHeartbeat(Base):
    """Liveness of the scheduler and worker processes, for /health (the database is the source of truth)."""

    __tablename__ = "service_heartbeats"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # e.g. "worker:host:pid"
    kind: Mapped[str] = mapped_column(String(32), index=True)  # scheduler | worker
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)


# ------------------------------------------------------------------------- tenants, API keys, idempotency


class Tenant(Base):
    """Who owns jobs, datasets and registered teachers; every API key belongs to one."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key, stored as the sha256 of the key (never the key); `prefix` identifies it to people."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class IdempotencyRecord(Base):
    """The first response to a request carrying an Idempotency-Key, replayed for repeats within the TTL."""

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(36))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column()
    response_headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    __table_args__ = (Index("uq_idempotency_tenant_key", "tenant_id", "key", unique=True),)


class DashboardSession(Base):
    """A signed-in browser: the sha256 of its random session id (the cookie holds the id), its key, expiry.

    Added by migration 0003. Ends at `expires_at`, at sign-out (row deleted) and when its key is revoked.
    """

    __tablename__ = "dashboard_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


# ------------------------------------------------------------------------------------------ webhooks


class WebhookEndpoint(Base):
    """A tenant's endpoint for job events; deliveries are signed with its `whsec_` secret."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    # Needed in clear to sign (HMAC); shown to the client once, at create.
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(500), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint (the outbox row), written in the transaction that ended the job."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the `webhook-id` header: msg_...
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[str] = mapped_column(String(36), index=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)  # no FK: the log outlives a deleted job
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)
