"""Create-time checks of what a client brings (issue 9): named students, held-out sets, numeric tables,
`.pt2` teachers; each refused with a 422 naming the field, read without torch from the files."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.core.config import get_settings

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "the", "was"]


def _root() -> Path:
    root = get_settings().file_root
    assert root is not None
    return root.resolve()


def _folder() -> Path:
    folder = get_settings().file_root / "byo" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return folder


def _bert_dir(folder: Path, name: str, words: list[str], layers: int = 2) -> Path:
    """What save_pretrained writes that matters here: config.json and a WordPiece vocab.txt."""
    directory = folder / name
    directory.mkdir()
    config = {"model_type": "bert", "vocab_size": len(words), "num_hidden_layers": layers, "hidden_size": 32}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


def _register(client: TestClient, location: Path, type_: str) -> str:
    name = f"m-{uuid.uuid4().hex[:8]}"
    payload = {"name": name, "kind": "local", "location": str(location), "type": type_}
    response = client.post("/distillation/teachers", json=payload)
    assert response.status_code == 201, response.text
    return name


def _text_job(teacher: str, folder: Path, **extra: Any) -> dict[str, Any]:
    (folder / "reviews.jsonl").write_text(
        "".join(json.dumps({"text": f"good film {i}", "label": i % 2}) + "\n" for i in range(20))
    )
    return {
        "teacher_model_name": teacher,
        "task": "sequence-classification",
        "dataset_config": {"kind": "file", "path": str(folder / "reviews.jsonl")},
        **extra,
    }


def test_a_student_with_another_vocabulary_is_refused_at_create(client: TestClient, problem: Any) -> None:
    folder = _folder()
    teacher = _register(client, _bert_dir(folder, "teacher", WORDS, layers=4), "transformer")
    other = _bert_dir(folder, "other", [*WORDS[:-2], "zebra", "quartz"])
    body = problem(
        client.post(
            "/distillation/jobs",
            json=_text_job(teacher, folder, student={"kind": "local", "path": str(other)}),
        ),
        422,
    )
    error = body["errors"][0]
    assert error["field"] == "student" and error["type"] == "vocabulary_mismatch"
    assert "only in the teacher's: ['the', 'was']" in error["msg"]
    assert "only in the student's: ['quartz', 'zebra']" in error["msg"]

    # The same vocabulary passes, stored resolved; target_compression stays unset for a named student.
    same = _bert_dir(folder, "same", WORDS)
    response = client.post(
        "/distillation/jobs", json=_text_job(teacher, folder, student={"kind": "local", "path": str(same)})
    )
    assert response.status_code == 201, response.text
    spec = response.json()["spec"]
    # Stored relative to the tenant's file root (the path helper's rule).
    assert spec["student"] == {"kind": "local", "path": str(same.relative_to(_root()))}
    assert spec["target_compression"] is None
    # A registered student is checked the same way.
    registered = _register(client, other, "transformer")
    body = problem(
        client.post(
            "/distillation/jobs",
            json=_text_job(teacher, folder, student={"kind": "registry", "name": registered}),
        ),
        422,
    )
    assert body["errors"][0]["type"] == "vocabulary_mismatch"


def test_student_config_overrides_and_layer_mapping_are_checked(client: TestClient, problem: Any) -> None:
    folder = _folder()
    teacher = _register(client, _bert_dir(folder, "teacher", WORDS, layers=4), "transformer")
    cases = [
        (
            {"student": {"kind": "config", "overrides": {"num_hiden_layers": 2}}},
            "student.overrides",
            "not fields",
        ),
        (
            {"student": {"kind": "config", "overrides": {"vocab_size": 5}}},
            "student.overrides",
            "may not change",
        ),
        (
            {
                "student": {"kind": "config", "overrides": {"num_hidden_layers": 2}},
                "training_config": {"layer_mapping": [0, 4]},
            },
            "training_config.layer_mapping",
            "needs 3 entries",
        ),
        ({"student": {"kind": "registry", "name": "nope"}}, "student.name", "Unknown model 'nope'"),
        ({"student": {"kind": "local", "path": str(folder / "missing")}}, "student.path", "No directory at"),
        ({"student": {"kind": "config", "overrides": {"x": [1]}}}, None, "overrides"),
    ]
    for extra, field, message in cases:
        body = problem(client.post("/distillation/jobs", json=_text_job(teacher, folder, **extra)), 422)
        if field is not None:
            assert body["errors"][0]["field"] == field, body
        assert message in body["detail"], (extra, body["detail"])
    ok = {"student": {"kind": "config", "overrides": {"num_hidden_layers": 2, "hidden_size": 16}}}
    assert client.post("/distillation/jobs", json=_text_job(teacher, folder, **ok)).status_code == 201


def test_held_out_sets_and_numeric_tables_are_checked(client: TestClient, problem: Any) -> None:
    folder = _folder()
    (folder / "train.csv").write_text("id,a,b,label\nr1,1,2,0\nr2,3,4,1\nr3,5,x,1\n")
    (folder / "val.csv").write_text("a,b,label\n1,2,0\n")
    saved = folder / "test-set"
    saved.mkdir()
    (saved / "state.json").write_text("{}")  # a save_to_disk directory is accepted as a path

    def job(**dataset: Any) -> dict[str, Any]:
        return {
            "teacher_model_name": "digits-cnn",
            "dataset_config": {"kind": "file", "path": str(folder / "train.csv"), **dataset},
        }

    body = problem(client.post("/distillation/jobs", json=job()), 422)
    assert "row 1: column 'id' is 'r1', not a number" in body["detail"]
    body = problem(client.post("/distillation/jobs", json=job(feature_columns=["a", "b"])), 422)
    assert body["errors"][0]["field"] == "dataset_config.feature_columns"
    assert "row 3: column 'b' is 'x'" in body["detail"]
    body = problem(client.post("/distillation/jobs", json=job(feature_columns=["a", "c"])), 422)
    assert "no column(s) ['c']" in body["detail"]
    (folder / "train.csv").write_text("id,a,b,label\nr1,1,2,0\nr2,3,4,1\n")
    body = problem(
        client.post(
            "/distillation/jobs",
            json=job(feature_columns=["a", "b"], validation={"kind": "file", "path": "nowhere.parquet"}),
        ),
        422,
    )
    assert body["errors"][0]["field"] == "dataset_config.validation.path"
    body = problem(
        client.post("/distillation/jobs", json=job(validation={"kind": "uploaded", "dataset_id": "nope"})),
        422,
    )
    assert body["errors"][0]["field"] == "dataset_config.validation.dataset_id"
    body = problem(client.post("/distillation/jobs", json=job(test={"kind": "builtin"})), 422)
    assert "test" in body["detail"]
    created = client.post(
        "/distillation/jobs",
        json=job(
            feature_columns=["a", "b"],
            validation={"kind": "file", "path": str(folder / "val.csv")},
            test={"kind": "file", "path": str(saved)},
        ),
    )
    assert created.status_code == 201, created.text
    dataset = created.json()["spec"]["dataset_config"]
    assert dataset["validation"]["path"] == str((folder / "val.csv").relative_to(_root()))
    assert dataset["test"]["path"] == str(saved.relative_to(_root()))


def test_pt2_teacher_is_registered_and_its_input_checked_against_the_data(
    client: TestClient, problem: Any
) -> None:
    import torch

    folder = _folder()
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(4, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "mlp.pt2"))
    (folder / "not-a-program.pt2").write_bytes(b"pickle? no")
    body = problem(
        client.post(
            "/distillation/teachers",
            json={
                "name": "bad-pt2",
                "kind": "local",
                "location": str(folder / "not-a-program.pt2"),
                "type": "program",
            },
        ),
        422,
    )
    assert "not a torch.export archive" in body["detail"]
    teacher = _register(client, folder / "mlp.pt2", "program")
    listed = client.get(f"/distillation/teachers/{teacher}").json()
    assert listed["type"] == "program" and listed["available_offline"]

    (folder / "wide.csv").write_text("a,b,c,d,label\n1,2,3,4,0\n5,6,7,8,1\n")
    body = problem(
        client.post(
            "/distillation/jobs",
            json={
                "teacher_model_name": teacher,
                "dataset_config": {"kind": "file", "path": str(folder / "wide.csv")},
            },
        ),
        422,
    )
    assert body["errors"][0]["type"] == "shape_mismatch"
    assert (
        "takes input ['batch', 3] (3 values per example, float32); the data has 4 feature columns"
        in body["detail"]
    )
    ok = {"kind": "file", "path": str(folder / "wide.csv"), "feature_columns": ["a", "b", "c"]}
    assert (
        client.post(
            "/distillation/jobs", json={"teacher_model_name": teacher, "dataset_config": ok}
        ).status_code
        == 201
    )
