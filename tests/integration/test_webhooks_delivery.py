"""Webhook delivery end to end: a real worker ends jobs, the real scheduler process sends the deliveries to
a receiver this test runs on 127.0.0.1, which is down for the first attempts and then gets exactly one
correctly signed delivery per ended job (Standard Webhooks headers, checked here with hmac directly)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from integration_helpers import Stack, free_port, tiny_spec, wait_for, wait_for_status

pytestmark = pytest.mark.integration

FAST_RETRIES = {
    "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    "WEBHOOK_RETRY_BASE_SECONDS": "0.3",
    "WEBHOOK_RETRY_MAX_DELAY_SECONDS": "0.6",
    "WEBHOOK_POLL_SECONDS": "0.1",
    "WEBHOOK_TIMEOUT_SECONDS": "2",
}


class Receiver:
    """A tiny HTTP server recording every POST (headers and raw body)."""

    def __init__(self, port: int) -> None:
        self.requests: list[dict[str, Any]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def private_api(auth_headers: dict[str, str]) -> Iterator[TestClient]:
    from app.core.config import Settings
    from app.main import create_app

    app = create_app(Settings(webhook_allow_private_networks=True))
    with TestClient(app, headers=auth_headers) as client:
        yield client


def _verify(secret: str, request: dict[str, Any]) -> None:
    """The Standard Webhooks check, written out: HMAC-SHA256 over "id.timestamp.body"."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) < 300, "timestamp is current"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + request["body"], hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    assert expected in headers["webhook-signature"].split(" "), "signature verifies"
    assert headers["content-type"] == "application/json"


def test_each_ended_job_is_delivered_once_signed_after_the_receiver_was_down(
    stack: Stack, private_api: TestClient
) -> None:
    api = private_api
    stack.start_scheduler(**FAST_RETRIES)
    stack.start_worker(concurrency=1)
    port = free_port()  # nothing listens here yet: the first attempts are refused
    created = api.post("/distillation/webhooks", json={"url": f"http://127.0.0.1:{port}/hooks"})
    assert created.status_code == 201, created.text
    endpoint = created.json()
    only_failed = api.post(
        "/distillation/webhooks", json={"url": f"http://127.0.0.1:{port}/failed", "events": ["job.failed"]}
    ).json()

    completed = api.post("/distillation/jobs", json={**tiny_spec(epochs=1), "auto_start": True}).json()
    cancelled = api.post("/distillation/jobs", json={**tiny_spec(epochs=1), "name": "c"}).json()
    assert api.post(f"/distillation/jobs/{cancelled['job_id']}/cancel").status_code == 200
    finished = wait_for_status(completed["job_id"], {"completed"}, timeout=90, stack=stack)
    # The worker compared the job's estimate with what it measured (and kept the throughput for later).
    comparison = finished.results["estimate"]
    assert comparison["actual_training_seconds"] == finished.results["training_seconds"] > 0
    assert finished.estimate["actual"]["flops_per_second"] > 0
    assert finished.estimate["actual"]["teacher_parameters"] == finished.results["original_parameters"]

    def deliveries(job_id: str) -> list[dict[str, Any]]:
        response = api.get(f"/distillation/jobs/{job_id}/webhook-deliveries")
        assert response.status_code == 200, response.text
        return list(response.json())

    job_ids = [completed["job_id"], cancelled["job_id"]]

    def every_delivery(check: Any) -> bool:
        found = [deliveries(j) for j in job_ids]
        return all(len(log) == 1 and check(log[0]) for log in found)

    # `attempts` counts claims: a third claim means two attempts were refused and recorded.
    wait_for(
        "two refused attempts for each delivery",
        lambda: every_delivery(lambda d: d["attempts"] >= 3 and d["status"] == "pending" and d["last_error"]),
        timeout=30,
    )
    receiver = Receiver(port)
    try:
        wait_for(
            f"both deliveries to succeed\n{stack.logs()}",
            lambda: every_delivery(lambda d: d["status"] == "delivered"),
            timeout=30,
        )
        requests = list(receiver.requests)
    finally:
        receiver.close()

    assert len(requests) == 2, [r["body"] for r in requests]
    by_job = {}
    for request in requests:
        assert request["path"] == "/hooks"
        _verify(endpoint["secret"], request)
        body = json.loads(request["body"])
        by_job[body["data"]["job_id"]] = (body, request["headers"]["webhook-id"])
    assert by_job[completed["job_id"]][0]["type"] == "job.completed"
    assert by_job[completed["job_id"]][0]["data"]["results"]["best_student_accuracy"] > 0
    assert by_job[cancelled["job_id"]][0]["type"] == "job.cancelled"
    assert by_job[cancelled["job_id"]][0]["data"]["name"] == "c"
    for job_id in job_ids:
        (delivery,) = deliveries(job_id)
        assert delivery["endpoint_id"] == endpoint["id"] != only_failed["id"]
        assert delivery["id"] == by_job[job_id][1], "webhook-id is the delivery's id"
        assert delivery["attempts"] >= 3 and delivery["last_status_code"] == 200  # 2+ refused, then 200
        assert delivery["last_error"] is None and delivery["delivered_at"] is not None
