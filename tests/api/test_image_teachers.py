"""Image classifiers in the registry and in jobs: a `.pt2` program registers as type image_classifier, task
image-classification takes it (and a folder of class folders as its dataset), other pairings are refused."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from app.core.config import get_settings
from tests.engine.vision_models import PlainCNN


def _name() -> str:
    return f"img-{uuid.uuid4().hex[:8]}"


def _program_and_images() -> tuple[Path, Path]:
    base = get_settings().file_root / "vision" / uuid.uuid4().hex
    (base / "images" / "cat").mkdir(parents=True)
    (base / "images" / "cat" / "a.png").write_bytes(b"not decoded by the API")
    program = base / "cnn.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(
        PlainCNN().eval(), (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(exported, str(program))  # read by the API as JSON only, loaded by the engine
    return program, base / "images"


def _job(teacher: str, task: str, dataset: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "teacher_model_name": teacher,
        "task": task,
        "target_compression": 0.25,
        "dataset_config": dataset,
        **extra,
    }


def test_a_pt2_image_classifier_registers_and_runs_with_image_folders(
    client: TestClient, problem: Any
) -> None:
    program, images = _program_and_images()
    root = get_settings().file_root
    name = _name()
    response = client.post(
        "/distillation/teachers",
        json={
            "name": name,
            "kind": "local",
            "location": str(program.relative_to(root)),
            "type": "image_classifier",
            "task": "image-classification",
        },
    )
    assert response.status_code == 201, response.text
    assert response.json()["available_offline"] is True

    folder = {"kind": "file", "path": str(images.relative_to(root))}
    preprocessing = {"preprocessing": {"size": [16, 16], "mean": [0.5], "std": [0.5]}}
    job = client.post(
        "/distillation/jobs", json=_job(name, "image-classification", folder, image_config=preprocessing)
    )
    assert job.status_code == 201, job.text
    stored = job.json()["spec"]
    assert stored["task"] == "image-classification"
    assert stored["dataset_config"]["path"] == str(images.relative_to(root))

    wrong = problem(client.post("/distillation/jobs", json=_job(name, "classification", folder)), 422)
    assert wrong["suggested_task"] == "image-classification"
    error = next(e for e in wrong["errors"] if e["type"] == "teacher_task_mismatch")
    assert error["field"] == "task" and "use task 'image-classification'" in error["msg"]


def test_image_classification_refuses_other_teachers_and_misplaced_options(
    client: TestClient, problem: Any
) -> None:
    _, images = _program_and_images()
    folder = {"kind": "file", "path": str(images.relative_to(get_settings().file_root))}
    body = problem(
        client.post("/distillation/jobs", json=_job("digits-cnn", "image-classification", folder)), 422
    )
    assert body["suggested_task"] == "classification" and "image_classifier" in body["detail"]
    text = problem(
        client.post("/distillation/jobs", json=_job("bert-large", "image-classification", folder)), 422
    )
    assert text["suggested_task"] == "sequence-classification"

    misplaced = _job("digits-cnn", "classification", {"kind": "builtin", "name": "digits"}, image_config={})
    assert (
        "image_config is for task 'image-classification'"
        in problem(client.post("/distillation/jobs", json=misplaced), 422)["detail"]
    )
    augmented = _job(
        "digits-cnn",
        "image-classification",
        folder,
        image_config={"augmentation": {"horizontal_flip": True}},
        training_config={"teacher_cache": "on"},
    )
    assert (
        "teacher_cache 'on' cannot be used"
        in problem(client.post("/distillation/jobs", json=augmented), 422)["detail"]
    )


def test_the_job_page_names_the_image_task(
    client: TestClient, make_client: Callable[..., TestClient], auth_headers: dict[str, str]
) -> None:
    program, images = _program_and_images()
    root = get_settings().file_root
    name = _name()
    teacher = {"name": name, "kind": "local", "location": str(program), "type": "image_classifier"}
    assert client.post("/distillation/teachers", json=teacher).status_code == 201
    folder = {"kind": "file", "path": str(images.relative_to(root))}
    prep = {"preprocessing": {"size": [16, 16]}}
    job = client.post(
        "/distillation/jobs", json=_job(name, "image-classification", folder, image_config=prep)
    )
    assert job.status_code == 201, job.text
    browser = make_client(headers={})
    key = auth_headers["Authorization"].removeprefix("Bearer ")
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', browser.get("/signin").text)
    assert token is not None
    signin = browser.post(
        "/signin", data={"api_key": key, "csrf_token": token.group(1)}, follow_redirects=False
    )
    assert signin.status_code == 303
    page = browser.get(f"/jobs/{job.json()['job_id']}").text
    assert '<dd id="job-task">image-classification</dd>' in page


def test_a_pt2_image_job_needs_preprocessing_that_fits_the_program(client: TestClient, problem: Any) -> None:
    program, images = _program_and_images()  # the program takes (batch, 3, 16, 16)
    root = get_settings().file_root
    name = _name()
    teacher = {
        "name": name,
        "kind": "local",
        "location": str(program.relative_to(root)),
        "type": "image_classifier",
    }
    assert client.post("/distillation/teachers", json=teacher).status_code == 201
    folder = {"kind": "file", "path": str(images.relative_to(root))}
    missing = problem(client.post("/distillation/jobs", json=_job(name, "image-classification", folder)), 422)
    assert [e["field"] for e in missing["errors"]] == ["image_config.preprocessing"]
    wrong = _job(name, "image-classification", folder, image_config={"preprocessing": {"size": [32, 32]}})
    body = problem(client.post("/distillation/jobs", json=wrong), 422)
    error = body["errors"][0]
    assert error["field"] == "image_config.preprocessing.size" and error["type"] == "shape_mismatch"
    assert "['batch', 3, 32, 32]" in error["msg"]
    right = _job(name, "image-classification", folder, image_config={"preprocessing": {"size": [16, 16]}})
    assert client.post("/distillation/jobs", json=right).status_code == 201
