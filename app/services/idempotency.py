"""Idempotency-Key: the first response to a (tenant, key) is stored with the job it made and replayed.

The record is written in the same transaction as the job, so either both exist or neither does. Two
requests racing with one key cannot both act: on PostgreSQL the second insert waits on the unique index
until the first commits and then fails (we replay the winner's response); on SQLite every transaction is
BEGIN IMMEDIATE, so the second only looks once the first has committed. A request that fails stores
nothing: the client may retry with the same key (e.g. after a 429).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Unprocessable
from app.models import IdempotencyRecord, utcnow

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Response headers worth replaying (the body and status carry the rest).
_REPLAYED_HEADERS = ("location",)


@dataclass(frozen=True)
class StoredResponse:
    """A response to replay: status, JSON body, and the headers worth repeating."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]


def request_hash(method: str, path: str, body: Any) -> str:
    """sha256 of the method, the path and the body as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(f"{method.upper()}\n{path}\n{canonical}".encode()).hexdigest()


def _find(session: Session, tenant_id: str, key: str) -> IdempotencyRecord | None:
    return session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key
        )
    )


def _as_stored(record: IdempotencyRecord, fingerprint: str, key: str) -> StoredResponse:
    if record.request_hash != fingerprint:
        raise Unprocessable(
            f"Idempotency-Key '{key}' was already used for a different request (another method, path or "
            "body); use a new key for a new request.",
            errors=[
                {
                    "loc": ["header", HEADER],
                    "field": HEADER,
                    "msg": "key reused with a different request",
                    "type": "idempotency_key_reused",
                }
            ],
        )
    return StoredResponse(
        status_code=record.status_code,
        body=dict(record.response_body),
        headers={str(k): str(v) for k, v in (record.response_headers or {}).items()},
    )


def purge_expired(session: Session, *, ttl_hours: float) -> int:
    """Delete records older than the TTL (lazily, from requests that carry a key). Returns the count."""
    cutoff = utcnow() - timedelta(hours=ttl_hours)
    result = session.execute(
        delete(IdempotencyRecord)
        .where(IdempotencyRecord.created_at < cutoff)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def begin(
    session: Session, *, tenant_id: str, key: str, fingerprint: str, ttl_hours: float
) -> StoredResponse | IdempotencyRecord:
    """Replay a repeat (StoredResponse), 422 if the request differs, else reserve the key (the record).

    The reservation is flushed, not committed: it commits with the caller's changes in `finish`, and a
    failed request rolls both back. A concurrent holder of the key makes the insert wait (PostgreSQL) and
    fail once the holder commits; then its response is replayed.
    """
    purge_expired(session, ttl_hours=ttl_hours)
    for _ in range(3):
        existing = _find(session, tenant_id, key)
        if existing is not None:
            return _as_stored(existing, fingerprint, key)
        record = IdempotencyRecord(
            tenant_id=tenant_id,
            key=key,
            request_hash=fingerprint,
            status_code=0,
            response_body={},
            response_headers={},
            created_at=utcnow(),
        )
        try:
            with session.begin_nested():
                session.add(record)
        except IntegrityError:
            # Another request with this key committed first; loop to replay its response.
            continue
        return record
    raise Conflict(f"Requests with Idempotency-Key '{key}' are racing; retry.")


def finish(
    session: Session,
    record: IdempotencyRecord,
    *,
    status_code: int,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    """Store the response in the reserved record and commit it together with the caller's changes."""
    record.status_code = status_code
    record.response_body = body
    record.response_headers = {k: v for k, v in headers.items() if k.lower() in _REPLAYED_HEADERS}
    session.commit()
