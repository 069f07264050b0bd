"""A teacher the engine cannot run with the job's task is refused at create (422 naming the task to use),
over real HTTP: before, a hub text teacher with `task: classification` got 201 and failed in the worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.live_server import live_server

TEXT_FILE = {"kind": "file", "path": "reviews.csv"}


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server() as url:
        yield url


def _create(server: str, headers: dict[str, str], **spec: Any) -> httpx.Response:
    body = {"target_compression": 0.25, "distillation_method": "response_distillation"} | spec
    return httpx.post(f"{server}/distillation/jobs", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("teacher", "task", "dataset", "use"),
    [
        ("bert-large", "classification", {"kind": "builtin", "name": "digits"}, "sequence-classification"),
        ("gpt2-medium", "classification", {"kind": "builtin", "name": "digits"}, "causal-lm"),
        ("digits-cnn", "sequence-classification", TEXT_FILE, "classification"),
        ("digits-cnn", "causal-lm", TEXT_FILE, "classification"),
    ],
)
def test_a_teacher_of_another_task_is_refused_at_create_naming_the_task_to_use(
    server: str,
    clean_database: str,
    auth_headers: dict[str, str],
    teacher: str,
    task: str,
    dataset: dict[str, str],
    use: str,
) -> None:
    response = _create(server, auth_headers, teacher_model_name=teacher, task=task, dataset_config=dataset)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    error = next(e for e in body["errors"] if e["type"] == "teacher_task_mismatch")
    assert error["field"] == "task"
    assert f"use task '{use}'" in error["msg"] and teacher in error["msg"]
    assert body["suggested_task"] == use
    listed = httpx.get(f"{server}/distillation/jobs", headers=auth_headers, timeout=10).json()
    assert listed["data"] == []  # nothing stored


def test_matching_teachers_and_tasks_are_still_accepted(
    server: str, clean_database: str, auth_headers: dict[str, str]
) -> None:
    digits = _create(
        server,
        auth_headers,
        teacher_model_name="digits-cnn",
        task="classification",
        dataset_config={"kind": "builtin", "name": "digits"},
    )
    assert digits.status_code == 201, digits.text
    problem = _create(
        server,
        auth_headers,
        teacher_model_name="bert-large",
        task="sequence-classification",
        dataset_config={"kind": "uploaded", "dataset_id": "nope"},
    ).json()
    # A text teacher with a text task: only the (missing) dataset is wrong, not the task.
    assert [e["type"] for e in problem["errors"]] == ["unknown_dataset"]


def test_a_registered_text_teacher_with_the_classification_task_is_refused(
    server: str, clean_database: str, auth_headers: dict[str, str]
) -> None:
    name = f"tiny-gpt-{uuid.uuid4().hex[:8]}"  # teachers outlive clean_database: a fresh name
    registered = httpx.post(
        f"{server}/distillation/teachers",
        json={"name": name, "kind": "hub", "location": "org/tiny-gpt", "type": "causal_lm"},
        headers=auth_headers,
        timeout=10,
    )
    assert registered.status_code == 201, registered.text
    response = _create(
        server,
        auth_headers,
        teacher_model_name=name,
        task="classification",
        dataset_config={"kind": "builtin", "name": "digits"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["suggested_task"] == "causal-lm"  # from its type: it names no default task
