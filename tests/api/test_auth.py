"""API keys and tenants: 401 without a valid key, admin key management, and isolation between tenants."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import ApiKey, Artifact, Job, JobStatus, Teacher

ADMIN_KEY = "admin-" + uuid.uuid4().hex
DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "training_config": {"epochs": 1},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}
ClientFactory = Callable[..., TestClient]


def _admin(make_client: ClientFactory, **overrides: Any) -> TestClient:
    return make_client(admin_api_key=ADMIN_KEY, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **overrides)


def _job(client: TestClient) -> str:
    response = client.post("/distillation/jobs", json=DIGITS)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


# ----------------------------------------------------------------------------------------- 401 answers


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer dk_not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + "x" * 5000},
    ],
    ids=["missing", "unknown", "basic-scheme", "empty-bearer", "huge"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/distillation/jobs"),
        ("POST", "/distillation/jobs"),
        ("GET", "/distillation/teachers"),
        ("GET", "/distillation/datasets"),
        ("POST", "/distillation/calculator"),
    ],
)
def test_requests_without_a_valid_key_are_401_with_a_bearer_challenge(
    make_client: ClientFactory, problem: Any, headers: dict[str, str], method: str, path: str
) -> None:
    client = make_client(headers=headers)
    response = client.request(method, path, json=DIGITS if method == "POST" else None)
    body = problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert body["title"] == "Unauthorized"


def test_health_and_docs_stay_public(make_client: ClientFactory) -> None:
    client = make_client(headers={})
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_openapi_declares_bearer_security_on_protected_routes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    assert schema["paths"]["/distillation/jobs"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    assert "401" in schema["paths"]["/distillation/jobs/{job_id}"]["get"]["responses"]


# ------------------------------------------------------------------------------------------- admin keys


def test_admin_issues_lists_and_revokes_keys(make_client: ClientFactory, problem: Any) -> None:
    admin = _admin(make_client)
    response = admin.post("/admin/keys", json={"tenant": "acme", "name": "ci"})
    assert response.status_code == 201, response.text
    issued = response.json()
    key = issued["key"]
    assert key.startswith("dk_") and len(key) >= 40
    assert issued["prefix"] == key[:11] and issued["tenant"] == "acme"
    # Stored hashed: the database holds sha256(key), never the key.
    with session_scope() as session:
        stored = session.get(ApiKey, issued["id"])
        assert stored is not None and stored.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key not in json.dumps([stored.prefix, stored.name, stored.key_hash])
    listed = {k["id"]: k for k in admin.get("/admin/keys").json()}
    assert "key" not in listed[issued["id"]] and listed[issued["id"]]["revoked_at"] is None

    user = make_client(headers={"Authorization": f"Bearer {key}"})
    assert user.get("/distillation/jobs").status_code == 200

    revoked = admin.delete(f"/admin/keys/{issued['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    body = problem(user.get("/distillation/jobs"), 401)
    assert "revoked" in body["detail"]
    problem(admin.delete(f"/admin/keys/{uuid.uuid4()}"), 404)


def test_a_second_key_of_a_tenant_sees_the_same_jobs(make_client: ClientFactory) -> None:
    admin = _admin(make_client)
    first = admin.post("/admin/keys", json={"tenant": "globex", "name": "one"}).json()
    second = admin.post("/admin/keys", json={"tenant": "globex", "name": "two"}).json()
    assert first["tenant_id"] == second["tenant_id"]
    job_id = _job(make_client(headers={"Authorization": f"Bearer {first['key']}"}))
    other = make_client(headers={"Authorization": f"Bearer {second['key']}"})
    assert other.get(f"/distillation/jobs/{job_id}").status_code == 200


def test_admin_endpoints_need_the_admin_key(
    make_client: ClientFactory, auth_headers: dict[str, str], problem: Any
) -> None:
    # A tenant key is not an admin key.
    tenant_client = make_client(admin_api_key=ADMIN_KEY, headers=auth_headers)
    response = tenant_client.get("/admin/keys")
    problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    problem(make_client(admin_api_key=ADMIN_KEY, headers={}).post("/admin/keys", json={}), 401)
    wrong = make_client(admin_api_key=ADMIN_KEY, headers={"Authorization": f"Bearer {ADMIN_KEY}x"})
    problem(wrong.get("/admin/keys"), 401)
    # No ADMIN_API_KEY configured: admin endpoints are off (403), whatever is sent.
    off = make_client(admin_api_key="", headers={"Authorization": "Bearer "})
    body = problem(off.get("/admin/keys"), 403)
    assert "ADMIN_API_KEY" in body["detail"]


def test_admin_key_request_is_bounded(make_client: ClientFactory, problem: Any) -> None:
    admin = _admin(make_client)
    problem(admin.post("/admin/keys", json={"tenant": "a" * 101, "name": "x"}), 422)
    problem(admin.post("/admin/keys", json={"tenant": "../etc", "name": "x"}), 422)
    problem(admin.post("/admin/keys", json={"tenant": "ok", "name": ""}), 422)
    problem(admin.post("/admin/keys", json={"tenant": "ok", "name": "x", "role": "admin"}), 422)


# ------------------------------------------------------------------------------------------- isolation


@pytest.fixture()
def two_tenants(make_client: ClientFactory, make_api_key: Callable[..., dict[str, str]]) -> tuple[Any, Any]:
    return make_client(headers=make_api_key()), make_client(headers=make_api_key())


def test_another_tenants_job_is_404_everywhere_and_never_listed(
    two_tenants: tuple[TestClient, TestClient], problem: Any
) -> None:
    alice, bob = two_tenants
    job_id = _job(alice)
    # A finished job with an artifact, so delete and download would succeed for its owner.
    folder = get_settings().jobs_dir / job_id / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_bytes(b"{}")
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.completed))
        session.add(
            Artifact(
                job_id=job_id,
                name="results.json",
                path=str(folder / "results.json"),
                size_bytes=2,
                sha256=hashlib.sha256(b"{}").hexdigest(),
            )
        )
    for method, path in [
        ("GET", f"/distillation/jobs/{job_id}"),
        ("POST", f"/distillation/jobs/{job_id}/start"),
        ("POST", f"/distillation/jobs/{job_id}/cancel"),
        ("DELETE", f"/distillation/jobs/{job_id}"),
        ("GET", f"/distillation/jobs/{job_id}/events"),
        ("GET", f"/distillation/jobs/{job_id}/artifacts"),
        ("GET", f"/distillation/jobs/{job_id}/artifacts/results.json"),
    ]:
        body = problem(bob.request(method, path), 404)
        assert body["detail"] == f"No job with id '{job_id}'.", (method, path)
    assert bob.get("/distillation/jobs").json()["data"] == []
    assert [j["job_id"] for j in alice.get("/distillation/jobs").json()["data"]] == [job_id]
    # The owner still can.
    assert alice.get(f"/distillation/jobs/{job_id}/artifacts/results.json").content == b"{}"
    assert alice.delete(f"/distillation/jobs/{job_id}").status_code == 204


def test_another_tenants_dataset_is_404_unlisted_and_unusable(
    two_tenants: tuple[TestClient, TestClient], problem: Any
) -> None:
    alice, bob = two_tenants
    upload = alice.post("/distillation/datasets", files={"file": ("d.csv", b"text,label\nhi,0\nho,1\n")})
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["dataset_id"]
    problem(bob.get(f"/distillation/datasets/{dataset_id}"), 404)
    assert bob.get("/distillation/datasets").json() == []
    assert [d["dataset_id"] for d in alice.get("/distillation/datasets").json()] == [dataset_id]
    spec = DIGITS | {
        "teacher_model_name": "bert-large",
        "task": "sequence-classification",
        "dataset_config": {"kind": "uploaded", "dataset_id": dataset_id},
    }
    body = problem(bob.post("/distillation/jobs", json=spec), 422)
    assert body["errors"][0]["type"] == "unknown_dataset"
    assert alice.post("/distillation/jobs", json=spec).status_code == 201


def test_another_tenants_teacher_is_404_unlisted_and_unusable(
    two_tenants: tuple[TestClient, TestClient], problem: Any
) -> None:
    alice, bob = two_tenants
    name = f"hub-{uuid.uuid4().hex[:8]}"
    registered = alice.post(
        "/distillation/teachers",
        json={"name": name, "kind": "hub", "location": "org/model", "type": "transformer"},
    )
    assert registered.status_code == 201, registered.text
    problem(bob.get(f"/distillation/teachers/{name}"), 404)
    bob_names = {t["name"] for t in bob.get("/distillation/teachers").json()}
    assert name not in bob_names and "digits-cnn" in bob_names  # seeded teachers are global
    assert name in {t["name"] for t in alice.get("/distillation/teachers").json()}
    body = problem(bob.post("/distillation/jobs", json=DIGITS | {"teacher_model_name": name}), 422)
    assert name not in body["valid_teachers"]
    with session_scope() as session:
        assert session.scalar(select(Teacher.tenant_id).where(Teacher.name == "digits-cnn")) is None
        assert session.scalar(select(Teacher.tenant_id).where(Teacher.name == name)) is not None


def test_two_tenants_may_register_one_teacher_name_and_each_job_uses_its_own(
    two_tenants: tuple[TestClient, TestClient], problem: Any
) -> None:
    """Names are unique per tenant: a registration never collides with (nor reveals) another tenant's, a
    global teacher's name stays taken for all, and each tenant's reads, jobs and estimates use its own."""
    alice, bob = two_tenants
    name = f"shared-{uuid.uuid4().hex[:8]}"
    teacher = {"name": name, "kind": "hub", "type": "transformer"}
    mine = alice.post(
        "/distillation/teachers", json=teacher | {"location": "org/alice", "params": 111_000_000}
    )
    assert mine.status_code == 201, mine.text
    theirs = bob.post("/distillation/teachers", json=teacher | {"location": "org/bob", "params": 222_000_000})
    assert theirs.status_code == 201, theirs.text
    assert alice.get(f"/distillation/teachers/{name}").json()["location"] == "org/alice"
    assert bob.get(f"/distillation/teachers/{name}").json()["location"] == "org/bob"
    assert [t["location"] for t in bob.get("/distillation/teachers").json() if t["name"] == name] == [
        "org/bob"
    ]

    again = alice.post("/distillation/teachers", json=teacher | {"location": "org/alice-2"})
    assert "already registered" in problem(again, 409)["detail"]
    seeded = bob.post("/distillation/teachers", json=teacher | {"name": "digits-cnn", "location": "org/x"})
    assert "already registered" in problem(seeded, 409)["detail"]  # a global name is everyone's

    job = {"teacher_model_name": name, "task": "causal-lm", "dataset_config": {"kind": "hub", "name": "x"}}
    for client, params in ((alice, 111_000_000), (bob, 222_000_000)):
        created = client.post("/distillation/jobs", json=job)
        assert created.status_code == 201, created.text
        assert created.json()["estimate"]["teacher_parameters"] == params  # its own teacher's size
        assert client.post("/distillation/jobs/estimate", json=job).json()["teacher_parameters"] == params
    with session_scope() as session:
        owners = session.scalars(select(Teacher.tenant_id).where(Teacher.name == name)).all()
    assert len(set(owners)) == 2


def test_per_tenant_queued_limit_is_429_while_other_tenants_may_queue(
    make_client: ClientFactory, make_api_key: Callable[..., dict[str, str]], problem: Any
) -> None:
    limits = {"tenant_max_queued_jobs": 2, "max_queued_jobs": 100}
    alice = make_client(headers=make_api_key(), **limits)
    bob = make_client(headers=make_api_key(), **limits)
    for _ in range(2):
        assert alice.post("/distillation/jobs", json=DIGITS | {"auto_start": True}).status_code == 201
    pending = _job(alice)
    response = alice.post(f"/distillation/jobs/{pending}/start")
    body = problem(response, 429)
    assert "TENANT_MAX_QUEUED_JOBS=2" in body["detail"] and int(response.headers["retry-after"]) >= 1
    problem(alice.post("/distillation/jobs", json=DIGITS | {"auto_start": True}), 429)
    assert alice.get(f"/distillation/jobs/{pending}").json()["status"] == "pending"
    # Another tenant's queue is its own.
    assert bob.post("/distillation/jobs", json=DIGITS | {"auto_start": True}).json()["status"] == "queued"
    # Room again once one of alice's queued jobs is cancelled.
    queued = [
        j["job_id"] for j in alice.get("/distillation/jobs", params={"status": "queued"}).json()["data"]
    ]
    assert alice.post(f"/distillation/jobs/{queued[0]}/cancel").status_code == 200
    assert alice.post(f"/distillation/jobs/{pending}/start").status_code == 202
