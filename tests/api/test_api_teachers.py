"""The teacher registry over HTTP: seeded defaults, registration of local directories and hub ids."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.core.config import get_settings


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _model_dir(with_config: bool = True) -> Path:
    folder = get_settings().file_root / "models" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    if with_config:
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


def test_seeded_defaults_are_listed_with_offline_availability(client: TestClient) -> None:
    teachers = {t["name"]: t for t in client.get("/distillation/teachers").json()}
    assert {"digits-cnn", "bert-large", "roberta-large", "gpt2-medium"} <= set(teachers)
    assert teachers["digits-cnn"]["kind"] == "builtin" and teachers["digits-cnn"]["available_offline"]
    bert = teachers["bert-large"]
    assert bert["location"] == "bert-large-uncased" and bert["params"] == 340_000_000
    assert bert["type"] == "transformer" and bert["builtin"] and not bert["available_offline"]
    assert teachers["gpt2-medium"]["type"] == "causal_lm"


def test_get_one_and_unknown_lists_valid_names(client: TestClient, problem: Any) -> None:
    assert client.get("/distillation/teachers/roberta-large").json()["params"] == 355_000_000
    body = problem(client.get("/distillation/teachers/nope"), 404)
    assert "digits-cnn" in body["valid_teachers"] and "digits-cnn" in body["detail"]


def test_register_local_directory_then_use_it_in_a_job(client: TestClient) -> None:
    folder = _model_dir()
    name = _name()
    relative = str(folder.relative_to(get_settings().file_root))
    payload = {
        "name": name,
        "kind": "local",
        "location": relative,
        "type": "transformer",
        "params": 4_000_000,
    }
    response = client.post("/distillation/teachers", json=payload | {"task": "sequence-classification"})
    assert response.status_code == 201, response.text
    teacher = response.json()
    assert response.headers["location"] == f"/distillation/teachers/{name}"
    assert teacher["location"] == relative  # relative to the file root, never the server's absolute path
    assert teacher["available_offline"] and not teacher["builtin"]
    assert teacher["task"] == "sequence-classification"
    assert name in [t["name"] for t in client.get("/distillation/teachers").json()]
    job = client.post(
        "/distillation/jobs",
        json={
            "teacher_model_name": name,
            "task": "causal-lm",
            "dataset_config": {"kind": "hub", "name": "x"},
        },
    )
    assert job.status_code == 201, job.text


def test_register_local_refuses_bad_directories(client: TestClient, problem: Any, tmp_path: Path) -> None:
    root = get_settings().file_root
    no_config = _model_dir(with_config=False)
    outside = tmp_path / "model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = _model_dir(with_config=False) / "escape"
    link.symlink_to(outside)
    cases = {
        str(no_config): "no config.json",
        str(root / "models" / "missing"): "No directory at 'models/missing'",
        str(outside): "outside the allowed root",
        "../../../../etc": "outside the allowed root",
        str(link): "outside the allowed root",
    }
    for location, message in cases.items():
        payload = {"name": _name(), "kind": "local", "location": location, "type": "transformer"}
        body = problem(client.post("/distillation/teachers", json=payload), 422)
        assert message in body["detail"], location


def test_register_hub_id_is_not_available_offline(client: TestClient, problem: Any) -> None:
    name = _name()
    payload = {"name": name, "kind": "hub", "location": "distilbert/distilgpt2", "type": "causal_lm"}
    teacher = client.post("/distillation/teachers", json=payload).json()
    assert teacher["kind"] == "hub" and teacher["available_offline"] is False
    for bad in ("a/b/c", "../x", "has space", "org/-x", "x" * 200):
        body = problem(
            client.post("/distillation/teachers", json=payload | {"name": _name(), "location": bad}), 422
        )
        assert "hub id" in body["detail"], bad
    body = problem(client.post("/distillation/teachers", json=payload), 409)
    assert name in body["detail"]


def test_register_validates_fields(client: TestClient, problem: Any) -> None:
    body = problem(
        client.post(
            "/distillation/teachers",
            json={"name": "bad/name", "kind": "ftp", "location": "x", "type": "transformer"},
        ),
        422,
    )
    assert {e["field"] for e in body["errors"]} == {"name", "kind"}
    body = problem(client.post("/distillation/teachers", json={"name": "digits-cnn"}), 422)
    assert {"kind", "location", "type"} <= {e["field"] for e in body["errors"]}
