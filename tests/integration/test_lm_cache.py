"""The reusable teacher-signal cache through the whole stack: two causal-lm jobs of one tenant on a worker,
the second hits the first's cache; the tenant lists and deletes it over HTTP, another tenant never sees it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from integration_helpers import Proc, Stack, wait_for

from app.core.config import get_settings
from tests.engine.tiny_models import lm_rows, save_tiny_gpt2, write_jsonl

pytestmark = pytest.mark.integration


def _finished(api: Any, job_id: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/distillation/jobs/{job_id}").json()
        return body if body["status"] in {"completed", "failed", "cancelled"} else None

    return wait_for(f"job {job_id} to finish", probe, timeout=180, interval=0.2)


def _run(api: Any, spec: dict[str, Any], stack: Stack) -> dict[str, Any]:
    created = api.post("/distillation/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert api.post(f"/distillation/jobs/{job_id}/start").status_code == 202
    job = _finished(api, job_id)
    assert job["status"] == "completed", (job["error"], stack.logs())
    return job


def test_second_job_hits_the_tenants_cache_listed_and_deleted_over_http(
    stack: Stack, shared_worker: Proc, api: Any, make_api_key: Any
) -> None:
    stack.shared.append(shared_worker)
    stack.start_scheduler()
    root = get_settings().file_root / "lm-cache" / uuid.uuid4().hex
    root.mkdir(parents=True)
    save_tiny_gpt2(root / "gpt2", layers=2, hidden=32, heads=4)
    write_jsonl(root / "lm.jsonl", lm_rows(60, seed=3))
    name = f"gpt2-{uuid.uuid4().hex[:8]}"
    registered = api.post(
        "/distillation/teachers",
        json={"name": name, "kind": "local", "location": str(root / "gpt2"), "type": "causal_lm"},
    )
    assert registered.status_code == 201, registered.text
    spec: dict[str, Any] = {
        "teacher_model_name": name,
        "task": "causal-lm",
        "target_compression": 0.4,
        "dataset_config": {"kind": "file", "path": str(root / "lm.jsonl")},
        "training_config": {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "teacher_cache": "on",
                            "teacher_cache_top_k": 8, "device": "cpu"},
    }  # fmt: skip

    first = _run(api, spec, stack)["results"]["teacher_signal_cache"]
    assert first["status"] == "miss"
    second = _run(api, spec | {"target_compression": 0.3}, stack)["results"]["teacher_signal_cache"]
    assert second["status"] == "hit" and second["key"] == first["key"]
    assert second["teacher_seconds_saved"] == pytest.approx(first["teacher_seconds"])

    listing = api.get("/distillation/teacher-caches").json()
    assert [c["key"] for c in listing["items"]] == [first["key"]]
    assert listing["items"][0]["hits"] == 1 and listing["items"][0]["teacher_name"] == name
    with TestClient(api.app, headers=make_api_key()) as other:
        assert other.get("/distillation/teacher-caches").json()["items"] == []
        assert other.delete(f"/distillation/teacher-caches/{first['key']}").status_code == 404
    assert api.delete(f"/distillation/teacher-caches/{first['key']}").status_code == 204
    assert api.get("/distillation/teacher-caches").json()["items"] == []
