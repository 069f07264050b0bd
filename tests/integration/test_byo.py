"""Bring your own, over HTTP on a real worker: a `.pt2` teacher and a model directory registered with
POST /distillation/teachers, the model named as a 'registry' student, validation as Parquet, test as an
upload; the worker resolves the registry name and the upload; the results say where each split came
from."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from integration_helpers import Stack, wait_for
from safetensors.torch import save_file
from torch import nn

from app.core.config import get_settings
from workers.distill.tasks.classification.models import MLP, model_config

pytestmark = pytest.mark.integration


def _blobs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0.0, 1.5, (3, 6))
    labels = rng.integers(0, 3, count)
    return (centres[labels] + rng.normal(0.0, 1.0, (count, 6))).astype(np.float32), labels


def test_pt2_teacher_registry_student_and_held_out_sets_on_a_worker(stack: Stack, api: Any) -> None:
    root = get_settings().file_root / f"byo-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    x, y = _blobs(400, seed=1)
    header = [f"f{i}" for i in range(6)]
    lines = [
        ",".join([*header, "label"]),
        *(",".join([*map(str, r.tolist()), str(int(c))]) for r, c in zip(x, y, strict=True)),
    ]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    vx, vy = _blobs(90, seed=2)
    Dataset.from_dict(
        {**{h: vx[:, i].tolist() for i, h in enumerate(header)}, "label": vy.tolist()}
    ).to_parquet(str(root / "val.parquet"))
    tx, ty = _blobs(120, seed=3)
    # Uploads are checked as text datasets (a 'text' column); the numeric job reads only feature_columns.
    test_rows = (
        ",".join(["row note", *map(str, r.tolist()), str(int(c))]) for r, c in zip(tx, ty, strict=True)
    )
    test_csv = "\n".join([",".join(["text", *header, "label"]), *test_rows])

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 96), nn.ReLU(), nn.Linear(96, 3))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(teacher(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(teacher.eval(), (torch.from_numpy(x[:4]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "teacher.pt2"))
    student_dir = root / "student"
    student_dir.mkdir()
    student = MLP(6, 3, [12])
    save_file(student.state_dict(), str(student_dir / "student.safetensors"))
    (student_dir / "student_config.json").write_text(json.dumps(model_config(student)))

    names = {"teacher": f"pt2-{uuid.uuid4().hex[:6]}", "student": f"mlp-{uuid.uuid4().hex[:6]}"}
    for role, location, type_ in (
        ("teacher", root / "teacher.pt2", "program"),
        ("student", student_dir, "mlp"),
    ):
        response = api.post(
            "/distillation/teachers",
            json={"name": names[role], "kind": "local", "location": str(location), "type": type_},
        )
        assert response.status_code == 201, response.text
    upload = api.post("/distillation/datasets", files={"file": ("test.csv", test_csv.encode(), "text/csv")})
    assert upload.status_code == 201, upload.text

    stack.start_worker()
    stack.start_scheduler()
    created = api.post(
        "/distillation/jobs",
        json={
            "teacher_model_name": names["teacher"],
            "student": {"kind": "registry", "name": names["student"]},
            "dataset_config": {
                "kind": "file",
                "path": str(root / "train.csv"),
                "feature_columns": header,
                "validation": {"kind": "file", "path": str(root / "val.parquet")},
                "test": {"kind": "uploaded", "dataset_id": upload.json()["dataset_id"]},
            },
            "training_config": {"epochs": 8, "batch_size": 32, "learning_rate": 1e-2, "temperature": 2.0},
            "auto_start": True,
        },
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/distillation/jobs/{job_id}").json()
        return body if body["status"] in {"completed", "failed", "cancelled"} else None

    job = wait_for("the job to finish", finished, timeout=180, interval=0.2)
    assert job["status"] == "completed", (job["error"], stack.logs())
    results = job["results"]
    assert results["student"]["kind"] == "registry" and results["student"]["hidden"] == [12]
    assert results["target_compression"] is None
    assert results["compression_ratio"] == pytest.approx(
        results["compressed_parameters"] / results["original_parameters"]
    )
    assert results["splits"]["validation"] == {"source": "val.parquet", "rows": 90, "given": True}
    assert results["splits"]["test"]["rows"] == 120 and results["splits"]["test"]["given"] is True
    assert results["teacher_accuracy"] > 0.8 and results["student_accuracy"] > 0.8
    # Registered without `params`: the finished job's measured count is now the teacher's (its next
    # estimate is made from it); the registry student is not the job's teacher and stays unsized.
    teacher = api.get(f"/distillation/teachers/{names['teacher']}").json()
    assert teacher["params"] == results["original_parameters"] > 0
    assert api.get(f"/distillation/teachers/{names['student']}").json()["params"] is None
    print(f"integration: registry student retention {results['accuracy_retention']:.3f}")
