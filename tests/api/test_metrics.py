"""/metrics (figures read from the database at scrape time, HTTP latency by route) and the JSON logs."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.core.db import session_scope
from app.core.logging import JsonFormatter, bind, configure_logging, log_context, tenant_var
from app.models import Job, JobStatus, ServiceHeartbeat, utcnow
from app.services.auth import authenticate
from tests.sse_helpers import DIGITS_JOB, tenant_of


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition as {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _job(tenant_id: str, status: JobStatus, **times: Any) -> str:
    with session_scope() as session:
        job = Job(
            spec=DIGITS_JOB,
            teacher_model_name="digits-cnn",
            status=status,
            tenant_id=tenant_id,
            **times,
        )
        session.add(job)
        session.flush()
        return job.id


def test_metrics_count_jobs_waits_durations_and_heartbeats_from_the_database(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    tenant = tenant_of(auth_headers)
    t0 = utcnow() - timedelta(minutes=10)
    _job(tenant, JobStatus.queued, queued_at=t0)
    _job(tenant, JobStatus.queued, queued_at=utcnow() - timedelta(seconds=90))
    _job(tenant, JobStatus.running, queued_at=t0, dispatched_at=t0 + timedelta(seconds=2), started_at=t0)
    _job(
        tenant,
        JobStatus.completed,
        queued_at=t0,
        dispatched_at=t0 + timedelta(seconds=0.2),
        started_at=t0 + timedelta(seconds=1),
        finished_at=t0 + timedelta(seconds=41),
    )
    _job(
        tenant,
        JobStatus.failed,
        queued_at=t0,
        dispatched_at=t0 + timedelta(seconds=20),
        started_at=t0 + timedelta(seconds=20),
        finished_at=t0 + timedelta(seconds=23),
    )
    with session_scope() as session:
        session.add(
            ServiceHeartbeat(
                id="worker:test-host:1",
                kind="worker",
                hostname="test-host",
                pid=1,
                last_seen_at=utcnow() - timedelta(seconds=12),
            )
        )
    try:
        response = client.get("/metrics", headers={})  # public, like /health: Prometheus has no key
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        samples = _samples(response.text)
    finally:
        with session_scope() as session:
            session.query(ServiceHeartbeat).filter(ServiceHeartbeat.id == "worker:test-host:1").delete()

    assert samples[("distillery_database_up", ())] == 1.0
    assert samples[("distillery_jobs", (("status", "queued"),))] == 2
    assert samples[("distillery_jobs", (("status", "running"),))] == 1
    assert samples[("distillery_jobs", (("status", "completed"),))] == 1
    assert samples[("distillery_jobs", (("status", "cancelled"),))] == 0
    assert samples[("distillery_queue_depth", ())] == 2
    assert 599 <= samples[("distillery_oldest_queued_seconds", ())] <= 700
    # Admission waits 2 s, 0.2 s and 20 s.
    wait = "distillery_admission_wait_seconds"
    assert samples[(f"{wait}_count", ())] == 3
    assert abs(samples[(f"{wait}_sum", ())] - 22.2) < 1e-6
    assert samples[(f"{wait}_bucket", (("le", "0.25"),))] == 1
    assert samples[(f"{wait}_bucket", (("le", "2.5"),))] == 2
    assert samples[(f"{wait}_bucket", (("le", "30.0"),))] == 3
    # Durations by final status: completed 40 s, failed 3 s.
    duration = "distillery_job_duration_seconds"
    assert samples[(f"{duration}_sum", (("status", "completed"),))] == 40
    assert samples[(f"{duration}_bucket", (("le", "30.0"), ("status", "completed")))] == 0
    assert samples[(f"{duration}_bucket", (("le", "60.0"), ("status", "completed")))] == 1
    assert samples[(f"{duration}_count", (("status", "failed"),))] == 1
    age = samples[
        ("distillery_service_heartbeat_age_seconds", (("kind", "worker"), ("service", "worker:test-host:1")))
    ]
    assert 12 <= age < 60


def test_http_latency_is_labelled_by_route_template_not_raw_path(client: TestClient) -> None:
    created = client.post("/distillation/jobs", json=DIGITS_JOB)
    job_id = created.json()["job_id"]
    for _ in range(3):
        assert client.get(f"/distillation/jobs/{job_id}").status_code == 200
    assert client.get("/distillation/jobs/no-such-job").status_code == 404
    text = client.get("/metrics").text
    samples = _samples(text)
    count = "distillery_http_request_duration_seconds_count"
    labels = (("method", "GET"), ("route", "/distillation/jobs/{job_id}"))
    assert samples[(count, (*labels, ("status", "200")))] == 3
    assert samples[(count, (*labels, ("status", "404")))] == 1
    assert samples[(count, (("method", "POST"), ("route", "/distillation/jobs"), ("status", "201")))] == 1
    assert job_id not in text and "no-such-job" not in text


def test_json_logs_carry_job_id_and_tenant_from_the_context() -> None:
    stream = io.StringIO()
    handler = configure_logging(fmt="json", level="INFO", stream=stream)
    try:
        log = logging.getLogger("distillery.test")
        with log_context(job_id="job-123", tenant="acme"):
            log.info("epoch %d done", 3, extra={"accuracy": 0.93})
        log.warning("outside")
        token = tenant_var.set(None)
        bind(tenant="beta")  # outside a request: the context variable
        log.info("bound")
        tenant_var.reset(token)
    finally:
        logging.getLogger().removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "epoch 3 done" and first["level"] == "INFO"
    assert first["job_id"] == "job-123" and first["tenant"] == "acme" and first["accuracy"] == 0.93
    assert first["logger"] == "distillery.test" and first["ts"].endswith("+00:00")
    assert "job_id" not in second and "tenant" not in second
    assert third["tenant"] == "beta"


def test_each_request_is_logged_as_json_with_its_route_job_id_and_tenant(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    job_id = client.post("/distillation/jobs", json=DIGITS_JOB).json()["job_id"]
    client.app.state.access_log.flush()  # the POST's line, to the handler it was meant for
    stream = io.StringIO()
    handler = configure_logging(fmt="json", level="INFO", stream=stream)
    try:
        assert client.get(f"/distillation/jobs/{job_id}").status_code == 200
        client.app.state.access_log.flush()  # lines are written a moment after their requests: now
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "distillery.http"]
    assert len(access) == 1
    assert access[0]["route"] == "/distillation/jobs/{job_id}" and access[0]["status"] == 200
    assert access[0]["job_id"] == job_id and access[0]["request_id"]
    with session_scope() as session:
        principal = authenticate(session, key=auth_headers["Authorization"].removeprefix("Bearer "))
    assert principal is not None and access[0]["tenant"] == principal.tenant_name
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
