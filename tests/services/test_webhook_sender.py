"""The webhook sender on the real database and real sockets: backoff doubles and is capped, a delivery is
given up after WEBHOOK_RETRY_HOURS, a disabled endpoint's and a private address's deliveries are not sent."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete

from app.core.config import Settings
from app.core.db import session_scope
from app.models import Tenant, WebhookDelivery, WebhookEndpoint, utcnow
from app.services.webhooks import deliver_due, new_secret, retry_delay


@pytest.fixture()
def tenant(clean_database: str) -> Iterator[str]:
    with session_scope() as session:
        session.execute(delete(WebhookDelivery))
        row = Tenant(name=f"hooks-{uuid.uuid4().hex[:8]}")
        session.add(row)
        session.flush()
        tenant_id = row.id
    yield tenant_id
    with session_scope() as session:
        session.execute(delete(WebhookDelivery))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns: connections are refused


def _delivery(tenant: str, *, url: str, age_hours: float = 0.0, enabled: bool = True) -> str:
    now = utcnow()
    with session_scope() as session:
        endpoint = WebhookEndpoint(
            tenant_id=tenant, url=url, secret=new_secret(), events=["job.completed"], enabled=enabled
        )
        session.add(endpoint)
        session.flush()
        delivery_id = f"msg_{uuid.uuid4().hex}"
        session.add(
            WebhookDelivery(
                id=delivery_id,
                endpoint_id=endpoint.id,
                tenant_id=tenant,
                job_id=str(uuid.uuid4()),
                event_type="job.completed",
                payload={"type": "job.completed", "data": {}},
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now - timedelta(hours=age_hours),
            )
        )
    return delivery_id


def _get(delivery_id: str) -> WebhookDelivery:
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        session.expunge(row)
        return row


def test_backoff_doubles_from_the_base_and_is_capped() -> None:
    settings = Settings(webhook_retry_base_seconds=5, webhook_retry_max_delay_seconds=3600)
    assert [retry_delay(n, settings) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert retry_delay(20, settings) == 3600
    # The default schedule keeps trying for at least a day.
    assert Settings().webhook_retry_hours >= 24


def test_a_refused_delivery_is_retried_later_then_given_up_after_the_retry_window(tenant: str) -> None:
    settings = Settings(webhook_allow_private_networks=True, webhook_retry_base_seconds=30)
    url = f"http://127.0.0.1:{_closed_port()}/hook"
    fresh = _delivery(tenant, url=url)
    old = _delivery(tenant, url=url, age_hours=settings.webhook_retry_hours)
    before = utcnow()
    assert deliver_due(settings) == {"pending": 1, "failed": 1}
    retried = _get(fresh)
    assert (
        retried.status == "pending" and retried.attempts == 1 and "ConnectError" in (retried.last_error or "")
    )
    assert timedelta(seconds=29) < retried.next_attempt_at - before < timedelta(seconds=40)
    gave_up = _get(old)
    assert gave_up.status == "failed" and gave_up.attempts == 1
    assert deliver_due(settings) == {}, "nothing is due before its next attempt"


def test_disabled_endpoints_and_private_addresses_are_not_sent_to(tenant: str) -> None:
    disabled = _delivery(tenant, url="http://127.0.0.1:9/hook", enabled=False)
    private = _delivery(tenant, url="http://127.0.0.1:9/hook")
    assert deliver_due(Settings(webhook_allow_private_networks=False)) == {"failed": 1, "pending": 1}
    assert _get(disabled).status == "failed" and _get(disabled).last_error == "endpoint disabled"
    refused = _get(private)
    assert refused.status == "pending" and refused.last_status_code is None
    assert "WEBHOOK_ALLOW_PRIVATE_NETWORKS" in (refused.last_error or "")
