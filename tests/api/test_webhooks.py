"""Webhook endpoints over HTTP: registration (secret shown once, `whsec_` form), refusal of private
addresses by default (SSRF), tenant isolation, and the outbox rows a job's end writes in its transaction."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.services.webhooks import sign

DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "training_config": {"epochs": 2, "batch_size": 32},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The example of the Standard Webhooks specification (and Svix's documentation).
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_private_loopback_and_link_local_addresses_are_refused_by_default(
    client: TestClient, problem: Any, url: str
) -> None:
    body = problem(client.post("/distillation/webhooks", json={"url": url}), 422)
    assert body["detail"].startswith("url:") and "WEBHOOK_ALLOW_PRIVATE_NETWORKS" in body["detail"]
    assert client.get("/distillation/webhooks").json() == []


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://8.8.8.8/hook", "http and https"),
        ("http:///nohost", "no host"),
        ("not a url", "http and https"),
    ],
)
def test_non_http_urls_are_refused(client: TestClient, problem: Any, url: str, says: str) -> None:
    body = problem(client.post("/distillation/webhooks", json={"url": url}), 422)
    assert says in body["detail"]


def test_unknown_event_types_are_refused(client: TestClient, problem: Any) -> None:
    body = problem(
        client.post("/distillation/webhooks", json={"url": "https://8.8.8.8/", "events": ["job.started"]}),
        422,
    )
    assert "events" in body["detail"]


def test_registration_shows_the_secret_once(make_client: Any) -> None:
    client = make_client(webhook_allow_private_networks=True)
    response = client.post(
        "/distillation/webhooks", json={"url": "http://127.0.0.1:9/hook", "description": "ci"}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert created["events"] == ["job.cancelled", "job.completed", "job.failed", "job.paused"]
    read = client.get(f"/distillation/webhooks/{created['id']}").json()
    assert "secret" not in read and read["url"] == "http://127.0.0.1:9/hook"
    assert all("secret" not in e for e in client.get("/distillation/webhooks").json())
    rotated = client.post(f"/distillation/webhooks/{created['id']}/rotate-secret").json()["secret"]
    assert rotated.startswith("whsec_") and rotated != secret

    patched = client.patch(
        f"/distillation/webhooks/{created['id']}", json={"events": ["job.failed"], "enabled": False}
    ).json()
    assert patched["events"] == ["job.failed"] and patched["enabled"] is False
    assert client.delete(f"/distillation/webhooks/{created['id']}").status_code == 204
    assert client.get(f"/distillation/webhooks/{created['id']}").status_code == 404


def test_another_tenants_endpoint_is_not_found(make_client: Any, make_api_key: Any) -> None:
    mine = make_client(webhook_allow_private_networks=True)
    theirs = make_client(webhook_allow_private_networks=True, headers=make_api_key())
    endpoint = theirs.post("/distillation/webhooks", json={"url": "http://127.0.0.1:9/"}).json()
    for method in ("get", "delete"):
        assert getattr(mine, method)(f"/distillation/webhooks/{endpoint['id']}").status_code == 404
    assert mine.patch(f"/distillation/webhooks/{endpoint['id']}", json={"enabled": False}).status_code == 404
    assert mine.get("/distillation/webhooks").json() == []


def test_a_jobs_end_writes_one_delivery_per_subscribed_endpoint(make_client: Any, make_api_key: Any) -> None:
    client = make_client(webhook_allow_private_networks=True)
    everything = client.post("/distillation/webhooks", json={"url": "http://127.0.0.1:9/all"}).json()
    client.post("/distillation/webhooks", json={"url": "http://127.0.0.1:9/f", "events": ["job.failed"]})
    other = make_client(webhook_allow_private_networks=True, headers=make_api_key())
    other.post("/distillation/webhooks", json={"url": "http://127.0.0.1:9/other"})

    job = client.post(
        "/distillation/jobs", json=DIGITS | {"auto_start": True, "name": "n", "metadata": {"k": "v"}}
    ).json()
    assert client.get(f"/distillation/jobs/{job['job_id']}/webhook-deliveries").json() == []
    client.post(f"/distillation/jobs/{job['job_id']}/pause")
    client.post(f"/distillation/jobs/{job['job_id']}/cancel")
    deliveries = client.get(f"/distillation/jobs/{job['job_id']}/webhook-deliveries").json()
    assert [(d["event_type"], d["endpoint_id"], d["status"]) for d in deliveries] == [
        ("job.paused", everything["id"], "pending"),
        ("job.cancelled", everything["id"], "pending"),
    ]
    payload = deliveries[1]["payload"]
    assert payload["type"] == "job.cancelled" and payload["data"]["job_id"] == job["job_id"]
    assert payload["data"]["name"] == "n" and payload["data"]["metadata"] == {"k": "v"}
    assert all(d["id"].startswith("msg_") for d in deliveries)
    assert other.get(f"/distillation/jobs/{job['job_id']}/webhook-deliveries").status_code == 404
