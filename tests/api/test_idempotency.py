"""Idempotency-Key on job create and start: replay, mismatch, expiry, failures, tenants and races."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.core.db import session_scope
from app.models import IdempotencyRecord, Job, utcnow

DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "training_config": {"epochs": 1, "batch_size": 32},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}
ClientFactory = Callable[..., TestClient]


def _key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4()}"}


def _job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_same_key_and_body_replays_the_first_response(client: TestClient) -> None:
    key = _key()
    first = client.post("/distillation/jobs", json=DIGITS, headers=key)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # The job moves on; the replay is still the first response.
    client.post(f"/distillation/jobs/{first.json()['job_id']}/start")
    again = client.post("/distillation/jobs", json=dict(reversed(list(DIGITS.items()))), headers=key)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.json()["status"] == "pending"
    assert again.headers["location"] == first.headers["location"]
    assert _job_count() == 1


def test_same_key_with_another_body_or_path_is_422(client: TestClient, problem: Any) -> None:
    key = _key()
    job_id = client.post("/distillation/jobs", json=DIGITS, headers=key).json()["job_id"]
    body = problem(
        client.post("/distillation/jobs", json=DIGITS | {"target_compression": 0.5}, headers=key), 422
    )
    assert body["errors"][0]["type"] == "idempotency_key_reused" and "Idempotency-Key" in body["detail"]
    problem(client.post(f"/distillation/jobs/{job_id}/start", headers=key), 422)
    assert _job_count() == 1
    assert client.get(f"/distillation/jobs/{job_id}").json()["status"] == "pending"


def test_start_with_a_key_replays_202_instead_of_409(client: TestClient, problem: Any) -> None:
    job_id = client.post("/distillation/jobs", json=DIGITS).json()["job_id"]
    key = _key()
    first = client.post(f"/distillation/jobs/{job_id}/start", headers=key)
    assert first.status_code == 202 and first.json()["status"] == "queued"
    again = client.post(f"/distillation/jobs/{job_id}/start", headers=key)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    problem(client.post(f"/distillation/jobs/{job_id}/start"), 409)  # without the key: a real second start
    problem(client.post(f"/distillation/jobs/{job_id}/start", headers=_key()), 409)


def test_a_failed_request_stores_nothing_so_the_key_can_be_retried(
    make_client: ClientFactory, auth_headers: dict[str, str], problem: Any
) -> None:
    key = _key()
    full = make_client(max_queued_jobs=1)
    assert full.post("/distillation/jobs", json=DIGITS | {"auto_start": True}).status_code == 201
    problem(full.post("/distillation/jobs", json=DIGITS | {"auto_start": True}, headers=key), 429)
    problem(full.post("/distillation/jobs", json=DIGITS | {"teacher_model_name": "nope"}, headers=key), 422)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0
    roomy = make_client(max_queued_jobs=10)
    retried = roomy.post("/distillation/jobs", json=DIGITS | {"auto_start": True}, headers=key)
    assert retried.status_code == 201 and retried.json()["status"] == "queued"
    assert _job_count() == 2


def test_keys_are_per_tenant(make_client: ClientFactory, make_api_key: Callable[..., dict[str, str]]) -> None:
    key = _key()
    alice = make_client(headers=make_api_key())
    bob = make_client(headers=make_api_key())
    a = alice.post("/distillation/jobs", json=DIGITS, headers=key)
    b = bob.post("/distillation/jobs", json=DIGITS, headers=key)
    assert a.status_code == b.status_code == 201 and "idempotent-replayed" not in b.headers
    assert a.json()["job_id"] != b.json()["job_id"]
    assert _job_count() == 2


def test_records_are_kept_24h_then_purged(client: TestClient) -> None:
    key = _key()
    first = client.post("/distillation/jobs", json=DIGITS, headers=key).json()
    with session_scope() as session:
        session.execute(
            update(IdempotencyRecord).values(created_at=utcnow() - timedelta(hours=23, minutes=50))
        )
    kept = client.post("/distillation/jobs", json=DIGITS, headers=key)
    assert kept.headers.get("idempotent-replayed") == "true" and kept.json()["job_id"] == first["job_id"]
    with session_scope() as session:
        session.execute(
            update(IdempotencyRecord).values(created_at=utcnow() - timedelta(hours=24, minutes=1))
        )
    # Expired: the key is free again (a different body is no longer a mismatch), and the old row is gone.
    fresh = client.post("/distillation/jobs", json=DIGITS | {"target_compression": 0.5}, headers=key)
    assert fresh.status_code == 201 and "idempotent-replayed" not in fresh.headers
    with session_scope() as session:
        rows = session.scalars(select(IdempotencyRecord)).all()
        assert [r.response_body["job_id"] for r in rows] == [fresh.json()["job_id"]]


def test_bad_keys_are_422(client: TestClient, problem: Any) -> None:
    problem(client.post("/distillation/jobs", json=DIGITS, headers={"Idempotency-Key": "k" * 256}), 422)
    problem(client.post("/distillation/jobs", json=DIGITS, headers={"Idempotency-Key": ""}), 422)
    assert _job_count() == 0


def test_concurrent_requests_with_one_key_make_one_job(client: TestClient) -> None:
    key = _key()
    barrier = threading.Barrier(6)
    responses: list[httpx.Response] = []
    errors: list[BaseException] = []

    def post() -> None:
        try:
            barrier.wait(timeout=10)
            responses.append(
                client.post("/distillation/jobs", json=DIGITS | {"auto_start": True}, headers=key)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 5
    assert _job_count() == 1
