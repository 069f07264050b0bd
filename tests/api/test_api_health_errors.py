"""/health, the problem+json answers for framework and unexpected errors, a database outage, and OpenAPI."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, delete
from sqlalchemy.orm import Session

from app.api.deps import get_session
from app.core.config import Settings
from app.core.db import session_scope
from app.main import create_app
from app.models import Job, JobStatus, ServiceHeartbeat


@pytest.fixture()
def heartbeats() -> Iterator[None]:
    yield
    with session_scope() as session:
        session.execute(delete(ServiceHeartbeat))


def _beat(kind: str, ident: str, age_seconds: float) -> None:
    with session_scope() as session:
        session.merge(
            ServiceHeartbeat(
                id=ident,
                kind=kind,
                hostname="test",
                pid=os.getpid(),
                last_seen_at=datetime.now(UTC) - timedelta(seconds=age_seconds),
            )
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_reports_each_part_and_job_counts(make_client: Any, heartbeats: None) -> None:
    client = make_client(tick_seconds=2, heartbeat_timeout=30)
    body = client.get("/health").json()
    assert body["database"]["status"] == "ok" and body["broker"]["status"] == "ok"
    assert body["scheduler"]["status"] == "down" and body["workers"]["alive"] == 0
    assert body["status"] == "degraded"
    _beat("scheduler", "scheduler:test:1", age_seconds=1)
    _beat("worker", "worker:test:1", age_seconds=5)
    _beat("worker", "worker:test:2", age_seconds=10)
    _beat("worker", "worker:test:3", age_seconds=31)  # stale: older than HEARTBEAT_TIMEOUT
    for status in (JobStatus.running, JobStatus.dispatched, JobStatus.completed, JobStatus.pending):
        with session_scope() as session:
            session.add(Job(spec={}, teacher_model_name="digits-cnn", status=status))
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["scheduler"]["status"] == "ok" and body["workers"] == body["workers"] | {
        "status": "ok",
        "alive": 2,
    }
    assert body["active_jobs"] == 2 and body["total_jobs"] == 4
    _beat("scheduler", "scheduler:test:1", age_seconds=7)  # older than 3 ticks
    body = client.get("/health").json()
    assert body["scheduler"]["status"] == "down" and body["status"] == "degraded"


def test_health_reports_a_dead_redis_broker(make_client: Any) -> None:
    client = make_client(broker_url=f"redis://127.0.0.1:{_free_port()}/0")
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["broker"]["status"] == "down" and response.json()["status"] == "degraded"


def test_database_down_is_503_problem(problem: Any) -> None:
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/none"
    engine = create_engine(unreachable, pool_pre_ping=False)

    def unreachable_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    # The request sessions, and the app's own engines (the key lookup and the hot reads use the asyncio
    # read engine built from its settings), point at a server that is not there.
    app = create_app(Settings(database_url=unreachable), wake_scheduler=False)
    app.dependency_overrides[get_session] = unreachable_session
    with TestClient(app) as client:
        body = problem(client.get("/health"), 503)
        assert body["title"] == "Database unavailable"
        # Authentication itself needs the database: 503, not 401.
        response = client.get("/distillation/jobs", headers={"Authorization": "Bearer dk_any"})
        problem(response, 503)
        assert response.headers["retry-after"]
    engine.dispose()


def test_unknown_path_and_method_are_problems(client: TestClient, problem: Any) -> None:
    assert problem(client.get("/distillation/nothing"), 404)["instance"] == "/distillation/nothing"
    response = client.put("/distillation/jobs")
    problem(response, 405)
    assert response.headers["allow"]


def test_malformed_json_is_a_422_problem(client: TestClient, problem: Any) -> None:
    response = client.post(
        "/distillation/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    problem(response, 422)


def test_unexpected_error_is_a_logged_500_problem(
    make_client: Any, problem: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(raise_server_exceptions=False, tick_seconds=1)

    def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
    with caplog.at_level("ERROR", logger="distillery.api"):
        body = problem(client.get("/boom"), 500)
    assert "secret internals" not in body["detail"]
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


def test_openapi_documents_every_operation(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) >= 16
    for path, method, op in operations:
        assert op.get("summary"), (path, method)
        assert op.get("tags"), (path, method)
        errors = {code: r for code, r in op["responses"].items() if code.startswith(("4", "5"))}
        assert errors, (path, method)
        for response in errors.values():
            assert "application/problem+json" in response["content"], (path, method)
    create = spec["paths"]["/distillation/jobs"]["post"]
    examples = create["requestBody"]["content"]["application/json"]["examples"]
    assert examples["digits"]["value"]["dataset_config"] == {"kind": "builtin", "name": "digits"}
    assert "429" in spec["paths"]["/distillation/jobs/{job_id}/start"]["post"]["responses"]
    upload = spec["paths"]["/distillation/datasets"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
