"""`distillery.Client` against a real API process: the job calls, paging, events, download, idempotent
retried POSTs, and a 429 retried after the server's Retry-After."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import distillery
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import Job
from tests.live_server import ROOT, live_server
from tests.sse_helpers import DIGITS_JOB, complete, create_job, report_epoch, start_and_claim, tenant_of

SERVER_ENV = {"SSE_POLL_SECONDS": "0.05", "SSE_KEEPALIVE_SECONDS": "1"}


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server(SERVER_ENV) as url:
        yield url


@pytest.fixture()
def settings(clean_database: str) -> Settings:
    return Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))


@pytest.fixture()
def client(server: str, settings: Settings, auth_headers: dict[str, str]) -> Iterator[distillery.Client]:
    key = auth_headers["Authorization"].removeprefix("Bearer ")
    with distillery.Client(server, key) as sdk:
        yield sdk


def test_create_get_list_with_paging_and_cancel(client: distillery.Client) -> None:
    created = [client.create(DIGITS_JOB) for _ in range(3)]
    assert all(job["status"] == "pending" for job in created)
    assert client.get(created[0]["job_id"])["teacher_model_name"] == "digits-cnn"

    first = client.list(limit=2)
    assert len(first.data) == 2 and first.has_more and first.next_cursor
    second = client.list(limit=2, cursor=first.next_cursor)
    assert len(second.data) == 1 and not second.has_more
    ids = [job["job_id"] for job in client.iter_jobs(page_size=2)]
    assert sorted(ids) == sorted(job["job_id"] for job in created)

    started = client.start(created[0]["job_id"])
    assert started["status"] in {"queued", "dispatched"}
    assert client.cancel(created[1]["job_id"])["status"] == "cancelled"
    with pytest.raises(distillery.ConflictError):
        client.start(created[1]["job_id"])  # a cancelled job cannot start
    with pytest.raises(distillery.NotFoundError):
        client.get("00000000-0000-0000-0000-000000000000")


def test_a_post_repeated_with_its_idempotency_key_makes_one_job(client: distillery.Client) -> None:
    one = client.create(DIGITS_JOB, idempotency_key="sdk-test-1")
    again = client.create(DIGITS_JOB, idempotency_key="sdk-test-1")
    assert one["job_id"] == again["job_id"]
    assert client.create(DIGITS_JOB)["job_id"] != one["job_id"]  # a fresh key per call by default


def test_invalid_specs_name_the_field(client: distillery.Client) -> None:
    with pytest.raises(distillery.InvalidRequestError) as caught:
        client.create(DIGITS_JOB | {"teacher_model_name": "no-such-teacher"})
    assert caught.value.status == 422
    assert [e["field"] for e in caught.value.errors] == ["teacher_model_name"]


def test_create_from_a_job_file(client: distillery.Client) -> None:
    job = client.create(ROOT / "examples" / "tiny.json", auto_start=True)
    assert job["status"] in {"queued", "dispatched"}


def test_events_wait_and_download(
    client: distillery.Client, settings: Settings, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    job_id = create_job(settings, tenant_of(auth_headers))
    with pytest.raises(distillery.NoArtifactsError):
        client.download(job_id, tmp_path / "none")
    assert not (tmp_path / "none").exists()

    claim = start_and_claim(settings, job_id)
    seen: list[distillery.Event] = []

    def follow() -> None:
        seen.extend(client.events(job_id))

    follower = threading.Thread(target=follow)
    follower.start()
    report_epoch(claim, 1, 2, accuracy=0.8, loss=0.9)
    report_epoch(claim, 2, 2, accuracy=0.9, loss=0.5)
    complete(claim, 2, artifact_files={"student.safetensors": b"weights", "results.json": b"{}"})
    follower.join(timeout=30)
    assert not follower.is_alive(), "events() did not end with the job"

    kinds = [event.kind for event in seen]
    assert "snapshot" in kinds and "state" in kinds
    epochs = [event.data["epoch"] for event in seen if event.kind == "metric"]
    assert epochs == [1, 2]
    ids = [event.id for event in seen if event.id is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids))

    job = client.wait(job_id, timeout=10, poll_interval=0.1)
    assert job["status"] == "completed"
    assert job["results"] is not None and job["results"]["teacher_accuracy"] == 0.9806
    written = client.download(job_id, tmp_path / "out")
    assert sorted(p.name for p in written) == ["results.json", "student.safetensors"]
    assert (tmp_path / "out" / "student.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "student.safetensors"]


def test_pause_and_resume_reach_the_server(client: distillery.Client) -> None:
    """The endpoints are another change's; the SDK sends the requests (an old server answers 404/405)."""
    job = client.create(DIGITS_JOB, auto_start=True)
    try:
        paused = client.pause(job["job_id"])
    except distillery.ApiError as exc:
        assert exc.status in {404, 405}, exc  # no pause endpoint on this server yet
        pytest.skip("this server has no pause/resume endpoints")
    assert paused["status"] in {"paused", "pausing"}
    assert client.resume(job["job_id"])["status"] in {"queued", "dispatched"}


def test_a_429_is_retried_after_the_servers_retry_after(
    migrated_database: str, settings: Settings, auth_headers: dict[str, str]
) -> None:
    key = auth_headers["Authorization"].removeprefix("Bearer ")
    limits = {"MAX_CONCURRENT_JOBS": "1", "TENANT_MAX_QUEUED_JOBS": "1", "TICK_SECONDS": "1"}
    retries: list[tuple[float, distillery.Retry]] = []
    with (
        live_server(SERVER_ENV | limits) as url,
        distillery.Client(url, key, on_retry=lambda retry: retries.append((time.monotonic(), retry))) as sdk,
    ):
        running = sdk.create(DIGITS_JOB, auto_start=True)["job_id"]
        deadline = time.monotonic() + 30
        while sdk.get(running)["status"] != "dispatched":  # the API's start admits it to the one slot
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = sdk.create(DIGITS_JOB, auto_start=True)["job_id"]  # the tenant's one queued job
        assert sdk.get(waiting)["status"] == "queued"

        # The queue is full: the next create answers 429 with Retry-After: 1 until a queued job leaves.
        threading.Timer(1.5, lambda: sdk.cancel(waiting)).start()
        started = time.monotonic()
        third = sdk.create(DIGITS_JOB, auto_start=True, idempotency_key="sdk-429")
        took = time.monotonic() - started

    assert third["status"] in {"queued", "dispatched"}
    assert retries and all(retry.status == 429 and retry.delay == 1.0 for _, retry in retries)
    assert took >= 1.0 * len(retries)  # it waited what the server asked, each time
    with session_scope() as session:  # the retried POST made one job, not one per attempt
        assert session.query(Job).count() == 3
