"""The live event stream (`Accept: text/event-stream`) against a real uvicorn server and the test database."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.config import Settings, get_settings
from tests.live_server import live_server
from tests.sse_helpers import (
    SseMessage,
    complete,
    create_job,
    iter_sse,
    report_epoch,
    start_and_claim,
    tenant_of,
)

SSE = {"Accept": "text/event-stream"}
STREAM_TIMEOUT = httpx.Timeout(20.0)


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server({"SSE_POLL_SECONDS": "0.05", "SSE_KEEPALIVE_SECONDS": "0.3"}) as url:
        yield url


@pytest.fixture()
def settings(clean_database: str) -> Settings:
    return Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))


@pytest.fixture()
def auth(auth_headers: dict[str, str]) -> dict[str, str]:
    return auth_headers


@pytest.fixture()
def tenant(auth: dict[str, str]) -> str:
    return tenant_of(auth)


def _events_in_db(server: str, job_id: str, auth: dict[str, str]) -> list[dict[str, Any]]:
    url = f"{server}/distillation/jobs/{job_id}/events"
    page = httpx.get(url, params={"limit": 1000}, headers=auth).json()
    assert page["has_more"] is False
    events: list[dict[str, Any]] = page["data"]
    return events


def _collect(server: str, job_id: str, headers: dict[str, str]) -> list[SseMessage]:
    url = f"{server}/distillation/jobs/{job_id}/events"
    with httpx.stream("GET", url, headers=SSE | headers, timeout=STREAM_TIMEOUT) as response:
        assert response.status_code == 200
        return list(iter_sse(response))


def test_stream_is_live_in_order_keeps_alive_and_ends_at_the_terminal_state(
    server: str, settings: Settings, auth: dict[str, str], tenant: str
) -> None:
    job_id = create_job(settings, tenant)
    epochs = 3
    received: list[SseMessage] = []
    driver_error: list[BaseException] = []
    keepalive_seen = threading.Event()

    def drive() -> None:
        # The job moves only once the client has the stream open and idle (a keep-alive arrived), so every
        # later event must come through the live poll, not from the initial backlog.
        try:
            assert keepalive_seen.wait(15)
            claim = start_and_claim(settings, job_id)
            for epoch in range(1, epochs + 1):
                report_epoch(claim, epoch, epochs, accuracy=0.5 + 0.1 * epoch, loss=1.0 / epoch)
            complete(claim, epochs)
        except BaseException as exc:
            driver_error.append(exc)

    driver = threading.Thread(target=drive)
    started = time.monotonic()
    url = f"{server}/distillation/jobs/{job_id}/events"
    with httpx.stream("GET", url, headers=SSE | auth, timeout=STREAM_TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        driver.start()
        for message in iter_sse(response):
            received.append(message)
            if message.comment is not None and "keep-alive" in message.comment:
                keepalive_seen.set()
    driver.join(10)
    assert not driver_error, driver_error
    assert time.monotonic() - started < 15

    assert received[0].retry == 2000
    stored = _events_in_db(server, job_id, auth)
    streamed = [m for m in received if m.id is not None]
    # Every stored event, once, in id order, with kind as the SSE event name and the event as data.
    assert [m.id for m in streamed] == [e["id"] for e in stored]
    assert [m.event for m in streamed] == [e["kind"] for e in stored]
    assert [m.data for m in streamed] == stored
    transitions = [m.data["data"]["to"] for m in streamed if m.event == "state"]
    assert transitions == ["pending", "queued", "dispatched", "running", "completed"]
    assert [m.data["data"]["epoch"] for m in streamed if m.event == "metric"] == [1, 2, 3]
    # Snapshots follow the row's progress; the stream ends with `end` after the last stored event.
    snapshots = [m.data for m in received if m.event == "snapshot"]
    assert snapshots[0]["status"] == "pending" and snapshots[-1]["status"] == "completed"
    assert snapshots[-1]["progress"] == 100.0
    assert received[-1].event == "end" and received[-1].data["status"] == "completed"
    last_event_index = max(i for i, m in enumerate(received) if m.id is not None)
    assert last_event_index < len(received) - 1


def test_resume_with_last_event_id_sends_only_the_rest(
    server: str, settings: Settings, auth: dict[str, str], tenant: str
) -> None:
    job_id = create_job(settings, tenant)
    claim = start_and_claim(settings, job_id)
    report_epoch(claim, 1, 2, accuracy=0.7, loss=0.9)

    # First connection: read up to the claim, then drop the connection mid-stream.
    url = f"{server}/distillation/jobs/{job_id}/events"
    first: list[SseMessage] = []
    with httpx.stream("GET", url, headers=SSE | auth, timeout=STREAM_TIMEOUT) as response:
        for message in iter_sse(response):
            first.append(message)
            if message.event == "claim":
                break
    last_id = next(m.id for m in reversed(first) if m.id is not None)

    report_epoch(claim, 2, 2, accuracy=0.8, loss=0.5)
    complete(claim, 2)

    resumed = _collect(server, job_id, auth | {"Last-Event-ID": str(last_id)})
    stored = _events_in_db(server, job_id, auth)
    resumed_ids = [m.id for m in resumed if m.id is not None]
    assert resumed_ids == [e["id"] for e in stored if e["id"] > last_id]
    assert resumed_ids and min(resumed_ids) > last_id
    first_ids = [m.id for m in first if m.id is not None]
    assert first_ids + resumed_ids == [e["id"] for e in stored]  # nothing lost, nothing twice
    assert resumed[-1].event == "end" and resumed[-1].data["status"] == "completed"


def test_stream_of_a_finished_job_replays_and_ends_at_once(
    server: str, settings: Settings, auth: dict[str, str], tenant: str
) -> None:
    job_id = create_job(settings, tenant)
    cancelled = httpx.post(f"{server}/distillation/jobs/{job_id}/cancel", headers=auth)
    assert cancelled.json()["status"] == "cancelled"
    messages = _collect(server, job_id, auth)
    assert [m.data["data"]["to"] for m in messages if m.event == "state"] == ["pending", "cancelled"]
    assert messages[-1].event == "end" and messages[-1].data["status"] == "cancelled"


def test_stream_errors_are_problems_and_json_stays_the_default(
    server: str, settings: Settings, auth: dict[str, str], tenant: str, make_api_key: Any
) -> None:
    missing = httpx.get(f"{server}/distillation/jobs/nope/events", headers=SSE | auth)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    job_id = create_job(settings, tenant)
    url = f"{server}/distillation/jobs/{job_id}/events"
    assert httpx.get(url, headers=SSE).status_code == 401
    assert httpx.get(url, headers=SSE | make_api_key()).status_code == 404  # another tenant's job
    bad = httpx.get(url, headers=SSE | auth | {"Last-Event-ID": "x"})
    assert bad.status_code == 422
    page = httpx.get(url, headers=auth)
    assert page.headers["content-type"] == "application/json"
    assert [e["kind"] for e in page.json()["data"]] == ["state"]


@pytest.mark.skipif(
    not get_settings().resolved_database_url.startswith("postgresql"),
    reason="needs PostgreSQL: SQLite serialises writers, so an event id cannot commit after a higher one",
)
def test_an_event_committed_after_a_higher_id_is_still_sent(
    server: str, settings: Settings, auth: dict[str, str], tenant: str
) -> None:
    from app.core.db import get_sessionmaker, session_scope
    from app.models import JobEvent
    from app.services import lifecycle

    job_id = create_job(settings, tenant)
    slow = get_sessionmaker()()
    try:
        lifecycle.record_event(slow, job_id=job_id, kind="log", message="slow writer")
        slow.flush()  # takes its id from the sequence now, commits later
        slow_id = slow.scalars(select(JobEvent.id).where(JobEvent.message == "slow writer")).one()
        with session_scope() as session:
            lifecycle.record_event(session, job_id=job_id, kind="log", message="fast writer")
        url = f"{server}/distillation/jobs/{job_id}/events"
        received: list[SseMessage] = []
        with httpx.stream("GET", url, headers=SSE | auth, timeout=STREAM_TIMEOUT) as response:
            for message in iter_sse(response):
                received.append(message)
                if message.data and message.data.get("message") == "fast writer":
                    slow.commit()  # the lower id becomes visible only now
                    assert httpx.post(f"{server}/distillation/jobs/{job_id}/cancel", headers=auth).is_success
    finally:
        slow.close()
    sent = [m.data["message"] for m in received if m.id is not None]
    assert sent[-3:-1] == ["fast writer", "slow writer"] and sent[-1].startswith("pending -> cancelled")
    assert [m.id for m in received if m.data and m.data.get("message") == "slow writer"] == [slow_id]


def test_stream_of_a_paused_job_ends_and_the_sdk_wait_returns_it(
    server: str, settings: Settings, auth: dict[str, str], tenant: str
) -> None:
    import distillery

    job_id = create_job(settings, tenant)
    assert httpx.post(f"{server}/distillation/jobs/{job_id}/start", headers=auth).status_code == 202
    paused = httpx.post(f"{server}/distillation/jobs/{job_id}/pause", headers=auth)
    assert paused.json()["status"] == "paused", paused.text
    messages = _collect(server, job_id, auth)  # returns: the stream ends although the job is not final
    states = [m.data["data"]["to"] for m in messages if m.event == "state"]
    assert states[:2] == ["pending", "queued"] and states[-1] == "paused"  # (dispatched, if admitted first)
    assert messages[-1].event == "end" and messages[-1].data["status"] == "paused"
    key = auth["Authorization"].removeprefix("Bearer ")
    with distillery.Client(server, api_key=key) as client:
        assert client.wait(job_id, timeout=10, poll_interval=0.1)["status"] == "paused"
