"""Any PyTorch teacher: a `.pt2` program of an MLP trained here, distilled into a derived student; numeric
data with feature_columns, validation as Parquet and test as a save_to_disk directory; named classification
students (a finished job's artifacts, config overrides)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.contract import ARTIFACT_WEIGHTS, EngineError, JobPaths
from workers.distill.runner import run_job
from workers.distill.tasks.classification.models import MLP
from workers.distill.tasks.classification.teachers import load_model_dir

FEATURES = [f"x{i}" for i in range(8)]


def _blobs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes in 8 dimensions, overlapping a little."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0.0, 1.5, (3, 8))
    labels = rng.integers(0, 3, count)
    return (centres[labels] + rng.normal(0.0, 1.0, (count, 8))).astype(np.float32), labels


def _columns(x: np.ndarray, y: np.ndarray) -> dict[str, list[Any]]:
    return {**{name: x[:, i].tolist() for i, name in enumerate(FEATURES)}, "label": y.tolist()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("program")
    x, y = _blobs(600, seed=1)
    with (root / "train.csv").open("w", newline="") as handle:  # plus a text id column: not a feature
        writer = csv.writer(handle)
        writer.writerow(["id", *FEATURES, "label"])
        writer.writerows(
            [f"row-{i}", *row.tolist(), int(label)] for i, (row, label) in enumerate(zip(x, y, strict=True))
        )
    Dataset.from_dict(_columns(*_blobs(150, seed=2))).to_parquet(str(root / "val.parquet"))
    Dataset.from_dict(_columns(*_blobs(200, seed=3))).save_to_disk(str(root / "test-set"))

    # "Any PyTorch model": a plain nn.Sequential trained here, exported with a dynamic batch.
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        loss = nn.functional.cross_entropy(teacher(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(teacher.eval(), (inputs[:4],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "teacher.pt2"))
    return root


def _spec(**extra: Any) -> JobSpec:
    dataset = {
        "kind": "file",
        "path": "train.csv",
        "feature_columns": FEATURES,
        "validation": {"kind": "file", "path": "val.parquet"},
        "test": {"kind": "file", "path": "test-set"},
    }
    dataset.update(extra.pop("dataset", {}))
    return JobSpec.model_validate(
        {
            "teacher_model_name": "teacher.pt2",
            **({} if "student" in extra else {"target_compression": 0.1}),
            "dataset_config": dataset,
            "training_config": {"epochs": 15, "batch_size": 32, "learning_rate": 1e-2, "temperature": 2.0},
            **extra,
        }
    )


def _run(root: Path, spec: JobSpec, name: str, teacher: str = "teacher.pt2") -> Any:
    source = TeacherSource(name=teacher, kind=TeacherSourceKind.local, location=teacher, type="program")
    return run_job(spec, teacher=source, paths=JobPaths(root / name), data_dir=root / "data", file_root=root)


def test_pt2_teacher_distils_into_a_derived_mlp_on_given_splits(workspace: Path) -> None:
    results = _run(workspace, _spec(), "job-pt2")
    assert results.teacher_accuracy > 0.8
    assert results.student_accuracy > 0.8 and results.accuracy_retention > 0.9
    assert results.student["kind"] == "derived"
    assert abs(results.compression_ratio - 0.1) / 0.1 <= 0.25
    splits = results.splits
    assert splits["validation"] == {"source": "val.parquet", "rows": 150, "given": True}
    assert splits["test"] == {"source": "test-set", "rows": 200, "given": True}
    assert splits["train"] == {"source": "train.csv", "rows": 600}
    # The student is an MLP over the 8 feature columns, reloadable from its artifacts.
    student = load_model_dir(workspace / "job-pt2" / "artifacts")
    assert isinstance(student, MLP) and student.config["in_features"] == 8
    print(f"pt2 -> derived retention {results.accuracy_retention:.3f} ratio {results.compression_ratio:.3f}")


def test_named_classification_students_local_and_config(workspace: Path) -> None:
    # A finished job's artifacts serve as the named student of the next job (local), 3 labels kept.
    local = _run(workspace, _spec(student={"kind": "local", "path": "job-pt2/artifacts"}), "job-local")
    assert local.student["kind"] == "local" and local.student["new_head"] is False
    assert local.target_compression is None
    # Pretrained already: its initial accuracy is the previous job's, measured before training.
    assert local.initial_student_accuracy > 0.8
    config = _run(
        workspace,
        _spec(student={"kind": "config", "overrides": {"hidden_size": 16, "num_hidden_layers": 2}}),
        "job-config",
    )
    assert config.student["hidden"] == [16, 16] and config.student["initialised_from"] == "random"
    weights = load_file(str(workspace / "job-config" / "artifacts" / ARTIFACT_WEIGHTS))
    assert weights["layers.1.weight"].shape == (16, 16)
    assert config.student_accuracy > 0.8
    print(f"local retention {local.accuracy_retention:.3f}; config retention {config.accuracy_retention:.3f}")


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        ({"dataset": {"feature_columns": FEATURES[:7]}}, "dataset_invalid", "takes input ('batch', 8)"),
        (
            {"dataset": {"feature_columns": None}},
            "dataset_invalid",
            "row 1: column 'id' is 'row-0', not a number",
        ),
        ({"distillation_method": "feature_distillation"}, "unsupported", "gives only logits"),
        (
            {"student": {"kind": "config", "overrides": {"channels": 4}}},
            "student_incompatible",
            "valid: hidden_size",
        ),
    ],
)
def test_mismatches_are_refused_before_training(
    workspace: Path, extra: dict[str, Any], code: str, message: str
) -> None:
    with pytest.raises(EngineError) as caught:
        _run(workspace, _spec(**extra), "job-refused")
    assert caught.value.code == code and message in caught.value.message


def test_progressive_stages_step_down_to_the_named_student(workspace: Path) -> None:
    spec = _spec(
        student={"kind": "config", "overrides": {"hidden_size": 8, "num_hidden_layers": 1}},
        distillation_method="progressive_distillation",
        training_config={"epochs": 4, "batch_size": 32, "learning_rate": 1e-2, "num_stages": 2},
    )
    results = _run(workspace, spec, "job-progressive")
    first, last = results.stages
    assert first.parameters > last.parameters == results.compressed_parameters
    assert results.student["hidden"] == [8]  # the last stage trains the named student
    assert results.student_accuracy > 0.7
