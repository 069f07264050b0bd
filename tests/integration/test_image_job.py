"""An image-classification job over HTTP on a real Celery worker: a `.pt2` CNN teacher registered in the
registry, digit PNGs in class folders under the file root, the student's artifacts listed and loadable."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from integration_helpers import Proc, Stack, wait_for

from app.core.config import get_settings
from tests.engine.vision_models import save_program_teacher, write_digit_folders

pytestmark = pytest.mark.integration


def test_a_pt2_image_job_completes_on_a_worker(stack: Stack, shared_worker: Proc, api: Any) -> None:
    stack.shared.append(shared_worker)
    stack.start_scheduler()
    root = get_settings().file_root
    base = root / "vision-int" / uuid.uuid4().hex
    write_digit_folders(base / "digits", per_class=12, size=16)
    torch.set_num_threads(1)
    save_program_teacher(base / "cnn.pt2", base / "digits", size=16, epochs=15)
    name = f"cnn-{uuid.uuid4().hex[:6]}"
    registered = api.post(
        "/distillation/teachers",
        json={"name": name, "kind": "local", "location": str((base / "cnn.pt2").relative_to(root)),
              "type": "image_classifier", "task": "image-classification"},
    )  # fmt: skip
    assert registered.status_code == 201, registered.text
    spec = {
        "teacher_model_name": name,
        "task": "image-classification",
        "target_compression": 0.5,
        "dataset_config": {"kind": "file", "path": str((base / "digits").relative_to(root))},
        "image_config": {"preprocessing": {"size": [16, 16], "mean": [0.5], "std": [0.5]}},
        "training_config": {"epochs": 2, "batch_size": 32, "learning_rate": 0.003, "device": "cpu"},
        "auto_start": True,
    }
    created = api.post("/distillation/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/distillation/jobs/{job_id}").json()
        return body if body["status"] in {"completed", "failed", "cancelled"} else None

    job = wait_for("the image job to finish", finished, timeout=240, interval=0.3)
    assert job["status"] == "completed", (job["error"], stack.logs())
    results = job["results"]
    assert results["task"] == "image-classification" and results["input_resolution"] == [16, 16]
    assert (
        results["teacher_accuracy"] > 0.3
        and results["compressed_parameters"] < results["original_parameters"]
    )
    artifacts = {a["name"] for a in api.get(f"/distillation/jobs/{job_id}/artifacts").json()}
    assert {"student.pt2", "student.onnx", "config.json", "preprocessor_config.json"} <= artifacts
