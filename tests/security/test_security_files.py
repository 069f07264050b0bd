"""Server paths: one tenant can never name the service's storage (another tenant's uploads, artifacts, keys).

Over real HTTP, two tenants: every attack is refused with a 422 naming the field and no server path, and
the legitimate use beside it (own uploads, own files under a configured root) keeps working.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import live_server
from tests.security.conftest import Server, TenantFactory, upload

DATA_DIR = Path(os.environ["DATA_DIR"]).resolve()
SECRET_ROWS = b"text,label\nalice's secret review,1\nanother private line,0\n"
# A classification job's own table must be numeric (checked at create since issue 9).
SECRET_TABLE = b"x,label\n0.25,1\n0.75,0\n"
SEQ = {
    "teacher_model_name": "digits-cnn",
    "task": "classification",
    "target_compression": 0.25,
    "training_config": {"epochs": 1},
}


def _file_job(client: httpx.Client, path: str) -> httpx.Response:
    return client.post("/distillation/jobs", json=SEQ | {"dataset_config": {"kind": "file", "path": path}})


def _problem(response: httpx.Response, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    # Request-model errors name the union member ("dataset_config.file.path"); service ones do not.
    fields = {e["field"].replace(".file.", ".").replace(".hub.", ".") for e in body.get("errors", [])}
    assert field in fields, (field, body)
    return body


def _no_server_paths(body: dict[str, Any], *roots: Path | None, given: str = "") -> None:
    """No server path in the answer, apart from the caller's own input echoed back."""
    text = str(body).replace(given, "<given>") if given else str(body)
    for root in (DATA_DIR, *roots):
        if root is not None:
            assert str(root) not in text, f"{root} leaked in {text}"


def test_without_a_root_file_datasets_and_local_teachers_are_refused_and_uploads_work(
    no_root_server: Server, two_tenants: TenantFactory
) -> None:
    alice, mallory = two_tenants(no_root_server)
    dataset = upload(alice.client, SECRET_ROWS)
    victim = DATA_DIR / "datasets" / f"{dataset['dataset_id']}.csv"
    assert victim.is_file()
    for path in (str(victim), f"datasets/{dataset['dataset_id']}.csv", "api_key", "jobs"):
        body = _problem(_file_job(mallory.client, path), "dataset_config.path")
        assert "ALLOWED_FILE_ROOT" in body["detail"] and "files_disabled" in str(body["errors"])
        _no_server_paths(body, given=path)
    teacher = {"name": f"t-{uuid.uuid4().hex[:8]}", "kind": "local", "location": "models", "type": "cnn"}
    body = _problem(mallory.client.post("/distillation/teachers", json=teacher), "location")
    assert "ALLOWED_FILE_ROOT" in body["detail"]

    # Beside it: Alice trains on her own upload; a hub teacher still registers.
    own = alice.client.post(
        "/distillation/jobs",
        json=SEQ | {"dataset_config": {"kind": "uploaded", "dataset_id": dataset["dataset_id"]}},
    )
    assert own.status_code == 201, own.text
    hub = {"name": f"h-{uuid.uuid4().hex[:8]}", "kind": "hub", "location": "org/model", "type": "transformer"}
    assert alice.client.post("/distillation/teachers", json=hub).status_code == 201
    # ...and Mallory cannot use Alice's upload by id either.
    stolen = mallory.client.post(
        "/distillation/jobs",
        json=SEQ | {"dataset_config": {"kind": "uploaded", "dataset_id": dataset["dataset_id"]}},
    )
    assert stolen.status_code == 422 and "unknown_dataset" in stolen.text


def test_a_shared_root_never_reaches_data_dir_and_answers_relative_paths(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    root = shared_root_server.file_root
    assert root is not None
    alice, mallory = two_tenants(shared_root_server)
    dataset = upload(alice.client, SECRET_ROWS)
    victim = DATA_DIR / "datasets" / f"{dataset['dataset_id']}.csv"
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    (folder / "link.csv").symlink_to(victim)
    (folder / "jobs").symlink_to(DATA_DIR / "jobs", target_is_directory=True)
    relative_escape = os.path.relpath(victim, root)  # ../data/datasets/<id>.csv
    for path in (str(victim), relative_escape, f"{folder.name}/link.csv", f"{folder.name}/jobs/x/y.csv"):
        body = _problem(_file_job(mallory.client, path), "dataset_config.path")
        assert "outside the allowed root" in body["detail"], path
        _no_server_paths(body, root, given=path)
    missing = _problem(_file_job(mallory.client, f"{folder.name}/missing.csv"), "dataset_config.path")
    assert f"'{folder.name}/missing.csv'" in missing["detail"]
    _no_server_paths(missing, root)

    # The legitimate use: a file under the root, stored and shown relative to it.
    (folder / "train.csv").write_bytes(SECRET_TABLE)
    job = _file_job(alice.client, str(folder / "train.csv"))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["dataset_config"]["path"] == f"{folder.name}/train.csv"
    model = folder / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    name = f"t-{uuid.uuid4().hex[:8]}"
    teacher = {"name": name, "kind": "local", "location": f"{folder.name}/model", "type": "transformer"}
    registered = alice.client.post("/distillation/teachers", json=teacher)
    assert registered.status_code == 201, registered.text
    assert registered.json()["location"] == f"{folder.name}/model" and registered.json()["available_offline"]
    assert mallory.client.get(f"/distillation/teachers/{name}").status_code == 404


def test_per_tenant_roots_keep_tenants_in_their_own_folders(
    per_tenant_server: Server, two_tenants: TenantFactory
) -> None:
    root = per_tenant_server.file_root
    assert root is not None
    alice, mallory = two_tenants(per_tenant_server)
    (root / alice.name).mkdir()
    (root / mallory.name).mkdir()
    (root / alice.name / "train.csv").write_bytes(SECRET_TABLE)
    (root / "top.csv").write_bytes(SECRET_TABLE)

    own = _file_job(alice.client, "train.csv")
    assert own.status_code == 201, own.text
    assert own.json()["spec"]["dataset_config"]["path"] == "train.csv"
    body = _problem(_file_job(mallory.client, "train.csv"), "dataset_config.path")
    assert "No file or directory at 'train.csv'" in body["detail"]
    for path in (f"../{alice.name}/train.csv", str(root / alice.name / "train.csv"), "../top.csv"):
        body = _problem(_file_job(mallory.client, path), "dataset_config.path")
        assert "outside the allowed root" in body["detail"], path
        _no_server_paths(body, root, given=path)


def test_held_out_splits_and_named_students_stay_inside_the_tenant(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    """The spec's other sources: held-out files and uploads, local and registry students."""
    root = shared_root_server.file_root
    assert root is not None
    alice, mallory = two_tenants(shared_root_server)
    dataset = upload(alice.client, SECRET_ROWS)
    victim = DATA_DIR / "datasets" / f"{dataset['dataset_id']}.csv"
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    (folder / "train.csv").write_bytes(SECRET_TABLE)
    (folder / "student").mkdir()
    base = SEQ | {"dataset_config": {"kind": "file", "path": f"{folder.name}/train.csv"}}

    def job(client: httpx.Client, **patch: Any) -> httpx.Response:
        spec = json.loads(json.dumps(base))
        for key, value in patch.items():
            if key in ("validation", "test"):
                spec["dataset_config"][key] = value
            else:
                spec[key] = value
        return client.post("/distillation/jobs", json=spec)

    for split in ("validation", "test"):
        body = _problem(
            job(mallory.client, **{split: {"kind": "file", "path": str(victim)}}),
            f"dataset_config.{split}.path",
        )
        _no_server_paths(body, root, given=str(victim))
        stolen = {"kind": "uploaded", "dataset_id": dataset["dataset_id"]}
        _problem(job(mallory.client, **{split: stolen}), f"dataset_config.{split}.dataset_id")
    body = _problem(
        job(mallory.client, student={"kind": "local", "path": str(DATA_DIR / "jobs")}), "student.path"
    )
    assert "outside the allowed root" in body["detail"]
    name = f"t-{uuid.uuid4().hex[:8]}"
    model = folder / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    own = {"name": name, "kind": "local", "location": f"{folder.name}/model", "type": "transformer"}
    assert alice.client.post("/distillation/teachers", json=own).status_code == 201
    _problem(job(mallory.client, student={"kind": "registry", "name": name}), "student.name")

    # Beside them, Alice's own held-out upload, file split, local and registry students are accepted.
    ok = job(
        alice.client,
        validation={"kind": "uploaded", "dataset_id": dataset["dataset_id"]},
        test={"kind": "file", "path": f"{folder.name}/train.csv"},
        student={"kind": "local", "path": str(folder / "student")},
    )
    assert ok.status_code == 201, ok.text
    stored = ok.json()["spec"]
    assert stored["dataset_config"]["test"]["path"] == f"{folder.name}/train.csv"
    assert stored["student"]["path"] == f"{folder.name}/student"
    assert job(alice.client, student={"kind": "registry", "name": name}).status_code == 201


@pytest.mark.parametrize(
    "bad",
    ["~nosuchuser/data.csv", "~/data.csv", "data\x00.csv", "data\n.csv", "\t"],
    ids=["tilde-user", "tilde", "nul", "newline", "tab"],
)
def test_odd_paths_are_422_naming_the_field_and_keep_the_connection(
    shared_root_server: Server, two_tenants: TenantFactory, bad: str
) -> None:
    alice, _ = two_tenants(shared_root_server)
    _problem(_file_job(alice.client, bad), "dataset_config.path")
    teacher = {"name": f"t-{uuid.uuid4().hex[:8]}", "kind": "local", "location": bad, "type": "cnn"}
    _problem(alice.client.post("/distillation/teachers", json=teacher), "location")
    # The same keep-alive connection still answers (a 500 made uvicorn drop it).
    assert alice.client.get("/distillation/teachers").status_code == 200


@pytest.mark.parametrize(
    "bad", ["org/name\n", "a--b", "org/..x", "-org/x", "org/x.", "a/b/c", "x" * 97, "org/x.git", "org name"]
)
def test_hub_ids_follow_the_hub_rules_for_teachers_and_datasets(
    shared_root_server: Server, two_tenants: TenantFactory, bad: str
) -> None:
    alice, _ = two_tenants(shared_root_server)
    teacher = {"name": f"h-{uuid.uuid4().hex[:8]}", "kind": "hub", "location": bad, "type": "causal_lm"}
    _problem(alice.client.post("/distillation/teachers", json=teacher), "location")
    job: dict[str, Any] = {"teacher_model_name": "gpt2-medium", "task": "causal-lm"}
    job["dataset_config"] = {"kind": "hub", "name": bad}
    _problem(alice.client.post("/distillation/jobs", json=job), "dataset_config.name")
    good = teacher | {"location": "distilbert/distilgpt2"}
    assert alice.client.post("/distillation/teachers", json=good).status_code == 201
    job["dataset_config"] = {"kind": "hub", "name": "roneneldan/TinyStories"}
    assert alice.client.post("/distillation/jobs", json=job).status_code == 201


@pytest.mark.parametrize("inside", ["same", "inside", "above"])
def test_a_file_root_overlapping_data_dir_stops_the_api_at_start_up(inside: str) -> None:
    root = {"same": DATA_DIR, "inside": DATA_DIR / "datasets", "above": DATA_DIR.parent}[inside]

    def start() -> None:
        with live_server({"ALLOWED_FILE_ROOT": str(root)}, startup_timeout=60):
            pytest.fail("the API started with a file root overlapping DATA_DIR")

    with pytest.raises(RuntimeError) as failed:
        start()
    assert "ALLOWED_FILE_ROOT" in str(failed.value) and "overlaps DATA_DIR" in str(failed.value)


def test_stale_partial_uploads_are_removed_at_start_up(migrated_database: str) -> None:
    uploads = DATA_DIR / "datasets"
    uploads.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = uploads / f".{uuid.uuid4()}.{host}.{dead.pid}.part"
    stale.write_bytes(b"half an upload")
    live = uploads / f".{uuid.uuid4()}.{host}.{os.getpid()}.part"  # this (live) process's upload
    live.write_bytes(b"in progress")
    other_host = uploads / f".{uuid.uuid4()}.elsewhere.1.part"
    other_host.write_bytes(b"recent, another host")
    try:
        with live_server():
            assert not stale.exists()
            assert live.exists() and other_host.exists()
    finally:
        for path in (stale, live, other_host):
            path.unlink(missing_ok=True)
