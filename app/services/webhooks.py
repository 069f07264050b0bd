"""Webhooks: tenants' endpoints, an outbox of deliveries, and the sender that signs and retries them.

When a job ends (completed, failed, cancelled) or pauses, `enqueue_for_transition` writes one delivery row
per subscribed endpoint in the same transaction as the job's state change (it is called by
`events.record_state_change`), so an event is never lost nor sent for a change that rolled back. The
scheduler process runs `deliver_due` in a thread of its own: it claims due rows (a short lease on
`next_attempt_at`, FOR UPDATE SKIP LOCKED on PostgreSQL), POSTs them signed as the Standard Webhooks
specification says (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">` keyed with the base64 secret after `whsec_`), and records the outcome: delivered on
2xx, else retried with exponential backoff for WEBHOOK_RETRY_HOURS (at least once: a crash between the
send and the record sends again, with the same `webhook-id` so receivers can de-duplicate).

Against server-side request forgery only http(s) URLs are taken, and URLs whose host resolves to a
private, loopback, link-local, multicast or reserved address are refused (at registration and again before
each send) unless WEBHOOK_ALLOW_PRIVATE_NETWORKS=true; the send connects to an address that check returned
(the name is not resolved twice, so a DNS answer changed in between cannot redirect it), and redirects are
not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Job, JobStatus, WebhookDelivery, WebhookEndpoint, utcnow

log = logging.getLogger("distillery.webhooks")

EVENT_TYPES = ("job.completed", "job.failed", "job.cancelled", "job.paused")
STATUS_EVENTS = {
    JobStatus.completed: "job.completed",
    JobStatus.failed: "job.failed",
    JobStatus.cancelled: "job.cancelled",
    JobStatus.paused: "job.paused",
}
SECRET_PREFIX = "whsec_"
MAX_ENDPOINTS_PER_TENANT = 20
# Deliveries claimed per pass and sent in parallel (one slow endpoint does not hold up the others).
_BATCH = 32
_SENDERS = 8
_USER_AGENT = "distillery-webhooks/1"


# ----------------------------------------------------------------------------------------- signing


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def encode_body(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


# ------------------------------------------------------------------------------------------ URLs


def _url_error(message: str) -> Unprocessable:
    return Unprocessable(
        f"url: {message}",
        errors=[{"loc": ["body", "url"], "field": "url", "msg": message, "type": "invalid_webhook_url"}],
    )


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refused(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def check_url(url: str, settings: Settings) -> str:
    """The URL if it may receive webhooks, else Unprocessable naming `url` (scheme, host, address range).

    With WEBHOOK_ALLOW_PRIVATE_NETWORKS the host is not resolved here (a name may resolve only later)."""
    _checked_addresses(url, settings, resolve=not settings.webhook_allow_private_networks)
    return url


def _checked_addresses(url: str, settings: Settings, *, resolve: bool = True) -> list[Address]:
    """The addresses `url`'s host resolves to, in the resolver's order, each one allowed; else Unprocessable.

    The sender connects to one of these very addresses (`_send`): resolving the name again at connect time
    would let a DNS answer that changed in between (DNS rebinding) send the request somewhere unchecked.
    `resolve=False`: the URL's form only ([] unless the host is an address).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _url_error(f"not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise _url_error("only http and https URLs receive webhooks")
    host = parts.hostname
    if not host:
        raise _url_error("the URL has no host")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if not resolve:
            return []
        try:
            infos = socket.getaddrinfo(
                host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as exc:
            raise _url_error(f"cannot resolve host {host!r} ({exc})") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if settings.webhook_allow_private_networks:
        return addresses
    refused = sorted(str(a) for a in addresses if _refused(a))
    if refused:
        raise _url_error(
            f"{host} resolves to {', '.join(refused)}: private, loopback and link-local addresses are "
            "refused (set WEBHOOK_ALLOW_PRIVATE_NETWORKS=true to allow them on a trusted network)"
        )
    return addresses


# ------------------------------------------------------------------------------------- endpoints


def create_endpoint(
    session: Session,
    *,
    tenant_id: str,
    url: str,
    events: list[str],
    description: str,
    settings: Settings,
) -> WebhookEndpoint:
    """Register an endpoint with a new secret (the caller shows it once)."""
    check_url(url, settings)
    count = len(
        session.scalars(select(WebhookEndpoint.id).where(WebhookEndpoint.tenant_id == tenant_id)).all()
    )
    if count >= MAX_ENDPOINTS_PER_TENANT:
        raise Conflict(
            f"Your tenant already has {count} webhook endpoints (at most {MAX_ENDPOINTS_PER_TENANT}); "
            "delete one first."
        )
    now = utcnow()
    endpoint = WebhookEndpoint(
        tenant_id=tenant_id,
        url=url,
        secret=new_secret(),
        events=sorted(set(events)),
        description=description,
        enabled=True,
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.commit()
    return endpoint


def list_endpoints(session: Session, *, tenant_id: str) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.tenant_id == tenant_id)
            .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        )
    )


def get_endpoint_or_raise(session: Session, *, endpoint_id: str, tenant_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise NotFound(f"No webhook endpoint with id '{endpoint_id}'.")
    return endpoint


def update_endpoint(
    session: Session,
    *,
    endpoint_id: str,
    tenant_id: str,
    changes: dict[str, Any],
    settings: Settings,
) -> WebhookEndpoint:
    """Change url, events, description or enabled; a new url is checked as at registration."""
    endpoint = get_endpoint_or_raise(session, endpoint_id=endpoint_id, tenant_id=tenant_id)
    if "url" in changes:
        check_url(changes["url"], settings)
    if "events" in changes:
        changes["events"] = sorted(set(changes["events"]))
    for key, value in changes.items():
        setattr(endpoint, key, value)
    endpoint.updated_at = utcnow()
    session.commit()
    return endpoint


def rotate_secret(session: Session, *, endpoint_id: str, tenant_id: str) -> WebhookEndpoint:
    """A new secret; deliveries from now on are signed with it."""
    endpoint = get_endpoint_or_raise(session, endpoint_id=endpoint_id, tenant_id=tenant_id)
    endpoint.secret = new_secret()
    endpoint.updated_at = utcnow()
    session.commit()
    return endpoint


def delete_endpoint(session: Session, *, endpoint_id: str, tenant_id: str) -> None:
    """Remove an endpoint; its pending deliveries go with it."""
    endpoint = get_endpoint_or_raise(session, endpoint_id=endpoint_id, tenant_id=tenant_id)
    session.delete(endpoint)
    session.commit()


# ---------------------------------------------------------------------------------------- outbox


def enqueue_for_transition(session: Session, *, job_id: str, new_status: str) -> int:
    """One delivery per enabled endpoint of the job's tenant subscribed to this change; added to the
    caller's transaction (the one that changed the job). Returns how many were added."""
    event_type = STATUS_EVENTS.get(new_status)  # type: ignore[call-overload]
    if event_type is None:
        return 0
    table = Job.__table__
    job = session.execute(
        select(
            table.c.id,
            table.c.tenant_id,
            table.c.name,
            table.c.job_metadata,
            table.c.status,
            table.c.attempt,
            table.c.teacher_model_name,
            table.c.error,
            table.c.results,
            table.c.finished_at,
        ).where(table.c.id == job_id)
    ).first()
    if job is None or job.tenant_id is None:
        return 0
    endpoints = [
        e
        for e in session.scalars(
            select(WebhookEndpoint).where(
                WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.enabled.is_(True)
            )
        )
        if event_type in (e.events or [])
    ]
    if not endpoints:
        return 0
    now = utcnow()
    data: dict[str, Any] = {
        "job_id": job.id,
        "name": job.name,
        "metadata": job.job_metadata or {},
        # The change being announced (another one may follow before the delivery is sent).
        "status": new_status,
        "attempt": job.attempt,
        "teacher_model_name": job.teacher_model_name,
        "error": job.error,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "url": f"/distillation/jobs/{job.id}",
    }
    if new_status == JobStatus.completed and job.results:
        results = job.results
        data["results"] = {
            key: results.get(key)
            for key in (
                "task",
                "metric",
                "best_student_accuracy",
                "accuracy_retention",
                "compression_ratio",
                "training_seconds",
            )
        }
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    for endpoint in endpoints:
        session.add(
            WebhookDelivery(
                id=f"msg_{uuid.uuid4().hex}",
                endpoint_id=endpoint.id,
                tenant_id=job.tenant_id,
                job_id=job.id,
                event_type=event_type,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(endpoints)


def list_deliveries(session: Session, *, job_id: str, tenant_id: str) -> list[WebhookDelivery]:
    """A job's delivery log, oldest first."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id, WebhookDelivery.tenant_id == tenant_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    )


# ---------------------------------------------------------------------------------------- sender


@dataclass(frozen=True)
class _Claimed:
    delivery_id: str
    attempt: int
    url: str
    secret: str
    payload: dict[str, Any]
    created_at: Any


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_delay(attempts: int, settings: Settings) -> float:
    """Seconds before attempt `attempts + 1`: base x 2^(attempts-1), capped."""
    return float(
        min(
            settings.webhook_retry_max_delay_seconds,
            settings.webhook_retry_base_seconds * 2 ** (attempts - 1),
        )
    )


def _claim_due(settings: Settings) -> list[_Claimed]:
    """Take up to _BATCH due deliveries: attempts + 1 and a lease on next_attempt_at, committed."""
    now = utcnow()
    lease = timedelta(seconds=settings.webhook_timeout_seconds + 30)
    claimed: list[_Claimed] = []
    with session_scope() as session:
        stmt = (
            select(WebhookDelivery, WebhookEndpoint)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(_BATCH)
        )
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True, of=WebhookDelivery)
        for delivery, endpoint in session.execute(stmt).all():
            delivery.attempts += 1
            delivery.next_attempt_at = now + lease
            claimed.append(
                _Claimed(
                    delivery_id=delivery.id,
                    attempt=delivery.attempts,
                    url=endpoint.url if endpoint.enabled else "",
                    secret=endpoint.secret,
                    payload=dict(delivery.payload),
                    created_at=delivery.created_at,
                )
            )
    return claimed


def _send(claimed: _Claimed, settings: Settings) -> _Outcome:
    """POST the delivery to an address its URL's host was checked to resolve to (pinned: the name is not
    resolved again), trying the next one when a connection fails; TLS still verifies the host's name."""
    if not claimed.url:
        return _Outcome(None, "endpoint disabled")
    try:
        addresses = _checked_addresses(claimed.url, settings)
    except Unprocessable as exc:
        return _Outcome(None, exc.detail)
    body = encode_body(claimed.payload)
    timestamp = int(time.time())
    url = httpx.URL(claimed.url)
    headers = {
        "host": url.netloc.decode("ascii"),  # host[:port], IDNA-encoded (httpx keeps userinfo apart)
        "content-type": "application/json",
        "user-agent": _USER_AGENT,
        "webhook-id": claimed.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(claimed.secret, msg_id=claimed.delivery_id, timestamp=timestamp, body=body),
    }
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    failure = "no address"
    # One client per delivery: a pooled connection is keyed by address, and another host behind the same
    # address must not get this host's TLS session.
    with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False) as client:
        for address in addresses:
            try:
                response = client.post(
                    url.copy_with(host=str(address)), content=body, headers=headers, extensions=extensions
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = f"{type(exc).__name__}: {exc}"[:500]
                continue  # the next address the name resolved to
            except httpx.HTTPError as exc:
                return _Outcome(None, f"{type(exc).__name__}: {exc}"[:500])
            error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
            return _Outcome(response.status_code, error)
    return _Outcome(None, failure)


def _record(claimed: _Claimed, outcome: _Outcome, settings: Settings) -> str:
    """Store the attempt's outcome (only if the claim is still ours); returns the delivery's status."""
    now = utcnow()
    values: dict[str, Any] = {
        "last_attempt_at": now,
        "last_status_code": outcome.status_code,
        "last_error": outcome.error,
    }
    if outcome.ok:
        values |= {"status": "delivered", "delivered_at": now}
    elif claimed.url == "":
        values |= {"status": "failed"}
    else:
        due = now + timedelta(seconds=retry_delay(claimed.attempt, settings))
        if due > claimed.created_at + timedelta(hours=settings.webhook_retry_hours):
            values |= {"status": "failed"}
        else:
            values |= {"next_attempt_at": due}
    with session_scope() as session:
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == claimed.delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == claimed.attempt,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    return str(values.get("status", "pending"))


def deliver_due(settings: Settings, *, pool: ThreadPoolExecutor | None = None) -> dict[str, int]:
    """One pass: send every due delivery once; returns counts by resulting status."""
    claimed = _claim_due(settings)
    counts: dict[str, int] = {}
    if not claimed:
        return counts

    def attempt(item: _Claimed) -> str:
        outcome = _send(item, settings)
        status = _record(item, outcome, settings)
        log.info(
            "webhook %s attempt %d -> %s: %s",
            item.delivery_id,
            item.attempt,
            status,
            outcome.error or outcome.status_code,
        )
        return status

    statuses = list(pool.map(attempt, claimed)) if pool else [attempt(item) for item in claimed]
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts


class WebhookSender(threading.Thread):
    """Runs `deliver_due` every WEBHOOK_POLL_SECONDS until `stop` is set (database errors are retried)."""

    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        super().__init__(name="webhook-sender", daemon=True)
        self._settings = settings
        self._stop_event = stop

    def run(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        with ThreadPoolExecutor(max_workers=_SENDERS, thread_name_prefix="webhook") as pool:
            while not self._stop_event.is_set():
                try:
                    counts = deliver_due(self._settings, pool=pool)
                except SQLAlchemyError as exc:
                    log.warning("webhook pass failed (retrying): %s", exc.__class__.__name__)
                    counts = {}
                if sum(counts.values()) < _BATCH:  # a full batch: more may be due, go again at once
                    self._stop_event.wait(self._settings.webhook_poll_seconds)
