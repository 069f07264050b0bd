"""The webhook sender on the real database and real sockets: backoff doubles and is capped, a delivery is
given up after WEBHOOK_RETRY_HOURS, a disabled endpoint's and a private address's deliveries are not sent."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

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


class _Receiver:
    """A real HTTP server on loopback that records the Host header of each POST it answers."""

    def __init__(self) -> None:
        import http.server
        import threading

        hosts: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                hosts.append(self.headers.get("host", ""))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.hosts = hosts
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[_Receiver]:
    served = _Receiver()
    yield served
    served.close()


def _resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """The system resolver, except that each name in `answers` resolves to its next answer (the last one
    repeats): a DNS server whose answer changes between two lookups. Returns the names looked up."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(name)
        address = answers[name].pop(0) if len(answers[name]) > 1 else answers[name][0]
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_send_goes_to_the_address_that_was_checked_not_to_a_second_lookup(
    tenant: str, receiver: _Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves to a public address when checked, then to loopback. The sender
    connects to the checked address (refused there), never to the loopback receiver a second lookup names."""
    asked = _resolver(monkeypatch, {"rebind.test": ["8.8.8.8", "127.0.0.1"]})
    delivery = _delivery(tenant, url=f"http://rebind.test:{receiver.port}/hook")
    assert deliver_due(Settings(webhook_allow_private_networks=False, webhook_timeout_seconds=2)) == {
        "pending": 1
    }
    assert asked == ["rebind.test"], "the name is resolved once per send"
    assert receiver.hosts == [], "the request reached the address of a second lookup"
    sent = _get(delivery)
    assert sent.last_status_code is None and "Connect" in (sent.last_error or "")


def test_a_pinned_send_still_names_its_host_and_is_delivered(
    tenant: str, receiver: _Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connecting to the resolved address keeps the URL's host in the Host header (and TLS's SNI), and an
    address that refuses the connection makes the sender try the name's next one."""
    real = socket.getaddrinfo

    def two_addresses(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "hooks.test":
            return real(host, port, *args, **kwargs)
        # First an address where nothing listens (the receiver is bound to 127.0.0.1 only), then its own.
        return real("127.0.0.2", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    delivery = _delivery(tenant, url=f"http://hooks.test:{receiver.port}/hook")
    assert deliver_due(Settings(webhook_allow_private_networks=True)) == {"delivered": 1}
    assert receiver.hosts == [f"hooks.test:{receiver.port}"]
    assert _get(delivery).last_status_code == 204
