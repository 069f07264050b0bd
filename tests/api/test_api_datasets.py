"""Dataset uploads: streamed to disk, size-limited, schema-checked; listed and usable by jobs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import get_settings

CSV = b"text,label\ngreat film,1\nawful plot,0\nfine,2\n"


def _upload(client: TestClient, filename: str, content: bytes, **data: str) -> Any:
    return client.post("/distillation/datasets", files={"file": (filename, content)}, data=data)


def test_csv_upload_is_checked_stored_and_listed(client: TestClient) -> None:
    response = _upload(client, "reviews.csv", CSV, name="reviews")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "reviews" and dataset["format"] == "csv"
    assert dataset["num_rows"] == 3 and dataset["columns"] == ["text", "label"] and dataset["num_labels"] == 3
    assert dataset["size_bytes"] == len(CSV) and dataset["sha256"] == hashlib.sha256(CSV).hexdigest()
    stored = get_settings().uploads_dir / f"{dataset['dataset_id']}.csv"
    assert stored.read_bytes() == CSV
    assert not list(get_settings().uploads_dir.glob(".*.part"))
    assert client.get(f"/distillation/datasets/{dataset['dataset_id']}").json() == dataset
    assert dataset["dataset_id"] in [d["dataset_id"] for d in client.get("/distillation/datasets").json()]
    job = client.post(
        "/distillation/jobs",
        json={
            "teacher_model_name": "bert-large",
            "task": "sequence-classification",
            "dataset_config": {"kind": "uploaded", "dataset_id": dataset["dataset_id"]},
        },
    )
    assert job.status_code == 201, job.text


def test_an_uploads_check_runs_in_the_process_pool_and_its_422_comes_back(
    client: TestClient, problem: Any
) -> None:
    """The check runs in `app.core.cpu_pool` (off the API's GIL); a refused file's problem comes back."""
    from app.core import cpu_pool

    cpu_pool.shutdown()
    bad = client.post("/distillation/datasets", files={"file": ("bad.csv", b"text,label\ngood,1\nbad\n")})
    assert "line 3" in problem(bad, 422)["detail"]
    assert cpu_pool.started(), "the check did not go through the process pool"
    cpu_pool.shutdown()


def test_jsonl_upload_detected_by_content_without_labels(client: TestClient, problem: Any) -> None:
    lines = [json.dumps({"text": f"line {i}", "source": "x"}) for i in range(4)]
    dataset = _upload(client, "corpus.txt", ("\n".join(lines) + "\n\n").encode()).json()
    assert dataset["format"] == "jsonl" and dataset["num_rows"] == 4
    assert dataset["columns"] == ["text", "source"] and dataset["num_labels"] is None
    assert dataset["name"] == "corpus.txt"
    spec = {
        "teacher_model_name": "bert-large",
        "task": "sequence-classification",
        "dataset_config": {"kind": "uploaded", "dataset_id": dataset["dataset_id"]},
    }
    body = problem(client.post("/distillation/jobs", json=spec), 422)
    assert "no 'label' column" in body["detail"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", b"review,label\nx,1\n", "no 'text' column"),
        ("a.csv", b"text,label\nx,-1\n", "negative"),
        ("a.csv", b"text,label\nx,one\n", "not an integer"),
        ("a.csv", b"text,label\n,1\n", "line 2: the 'text' value is empty"),
        ("a.csv", b"text,label\n", "no rows"),
        ("a.csv", "text,label\ncaf\u00e9,1\n".encode("latin-1"), "not UTF-8"),
        ("a.jsonl", b'{"text": "x", "label": 1.5}\n', "not an integer"),
        ("a.jsonl", b'{"text": "x"}\n[1]\n', "line 2: each line must be a JSON object"),
        ("a.jsonl", b'{"text": "x"}\n{"text": \n', "line 2: not valid JSON"),
        ("a.jsonl", b'{"label": 1}\n', "no 'text' field"),
    ],
)
def test_bad_files_get_422_naming_the_problem(
    client: TestClient, problem: Any, name: str, content: bytes, message: str
) -> None:
    before = set(get_settings().uploads_dir.iterdir())
    body = problem(_upload(client, name, content), 422)
    assert message in body["detail"]
    assert set(get_settings().uploads_dir.iterdir()) == before  # nothing left behind


def test_upload_over_the_limit_is_413_and_leaves_nothing(make_client: Any, problem: Any) -> None:
    client = make_client(max_upload_bytes=100)
    before = set(get_settings().uploads_dir.iterdir())
    big = b"text,label\n" + b"word words,1\n" * 20
    body = problem(_upload(client, "big.csv", big), 413)
    assert body["max_upload_bytes"] == 100
    assert set(get_settings().uploads_dir.iterdir()) == before
    assert _upload(client, "small.csv", b"text,label\nok,1\n").status_code == 201


def test_upload_needs_a_multipart_file_part(client: TestClient, problem: Any) -> None:
    problem(client.post("/distillation/datasets", json={"text": "x"}), 422)
    body = problem(
        client.post("/distillation/datasets", data={"name": "x"}, files={"other": ("a.csv", CSV)}), 422
    )
    assert "'file'" in body["detail"]


def test_unknown_dataset_is_404(client: TestClient, problem: Any) -> None:
    body = problem(client.get("/distillation/datasets/nope"), 404)
    assert "GET /distillation/datasets" in body["detail"]


def test_get_dataset_path_for_workers(client: TestClient) -> None:
    from app.core.db import session_scope
    from app.errors import NotFound
    from app.services.datasets import get_dataset_path

    dataset = _upload(client, "w.csv", CSV).json()
    with session_scope() as session:
        path = get_dataset_path(session, dataset["dataset_id"])
        assert path == get_settings().uploads_dir / f"{dataset['dataset_id']}.csv"
        assert Path(path).read_bytes() == CSV
        with pytest.raises(NotFound):
            get_dataset_path(session, "missing")
