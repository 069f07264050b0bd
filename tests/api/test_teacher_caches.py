"""/distillation/teacher-caches: a tenant lists, reads and deletes its own caches only; LRU eviction."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import Tenant
from app.services import teacher_caches


def _tenant_id(name: str) -> str:
    with session_scope() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == name))
    assert tenant_id is not None
    return str(tenant_id)


def _write_cache(data_dir: Path, owner: str, *, size: int = 1000, used: float | None = None) -> str:
    """A cache folder as the engine writes it (meta.json beside signal.safetensors)."""
    key = uuid.uuid4().hex
    folder = teacher_caches.owner_dir(data_dir, owner) / key
    folder.mkdir(parents=True)
    (folder / teacher_caches.SIGNAL_FILE).write_bytes(b"\0" * size)
    now = used if used is not None else time.time()
    meta: dict[str, Any] = {
        "format": 1, "key": key, "owner": owner, "teacher_name": "tiny-gpt2", "task": "causal-lm",
        "teacher_fingerprint": "f" * 64, "data_fingerprint": "d" * 64, "max_seq_length": 64, "top_k": 16,
        "tail": False, "temperature": None, "layout": {"hidden": 0, "attn": 0}, "examples": 10, "tokens": 100,
        "bytes": size, "bytes_per_token": size / 100, "teacher_seconds": 1.5, "hits": 0, "created_at": now,
        "last_used_at": now,
    }  # fmt: skip
    teacher_caches.write_meta(folder, meta)
    return key


def test_tenants_see_and_delete_only_their_own_caches(
    make_client: Any, make_api_key: Any, problem: Any
) -> None:
    suffix = uuid.uuid4().hex[:8]
    alice_headers, bob_headers = make_api_key(f"alice-{suffix}"), make_api_key(f"bob-{suffix}")
    alice, bob = _tenant_id(f"alice-{suffix}"), _tenant_id(f"bob-{suffix}")
    data_dir = get_settings().data_dir
    older = _write_cache(data_dir, alice, used=time.time() - 60)
    newer = _write_cache(data_dir, alice)
    bobs = _write_cache(data_dir, bob)
    alice_client = make_client(headers=alice_headers)
    bob_client = make_client(headers=bob_headers)

    page = alice_client.get("/distillation/teacher-caches").json()
    assert [c["key"] for c in page["items"]] == [newer, older]  # most recently used first
    assert page["total_bytes"] == 2000 and page["max_bytes"] == get_settings().teacher_signal_cache_max_bytes
    assert "owner" not in page["items"][0] and page["items"][0]["teacher_seconds"] == 1.5
    assert alice_client.get(f"/distillation/teacher-caches/{newer}").json()["top_k"] == 16

    # Another tenant's cache does not exist for you: not readable, not deletable.
    problem(alice_client.get(f"/distillation/teacher-caches/{bobs}"), 404)
    problem(alice_client.delete(f"/distillation/teacher-caches/{bobs}"), 404)
    assert [c["key"] for c in bob_client.get("/distillation/teacher-caches").json()["items"]] == [bobs]

    assert alice_client.delete(f"/distillation/teacher-caches/{older}").status_code == 204
    assert not (teacher_caches.owner_dir(data_dir, alice) / older).exists()
    problem(alice_client.get(f"/distillation/teacher-caches/{older}"), 404)
    problem(alice_client.get("/distillation/teacher-caches/not-a-key"), 422)
    problem(make_client(headers={}).get("/distillation/teacher-caches"), 401)


def test_eviction_removes_least_recently_used_across_owners(tmp_path: Path) -> None:
    now = time.time()
    oldest = _write_cache(tmp_path, "t1", size=400, used=now - 30)
    middle = _write_cache(tmp_path, "t2", size=400, used=now - 20)
    kept = _write_cache(tmp_path, "t1", size=400, used=now - 10)
    with teacher_caches.locked(tmp_path):
        evicted = teacher_caches.evict_to_fit(tmp_path, max_bytes=900)
    assert evicted == [oldest]
    # A use moves a cache to the front of the LRU order.
    entry = teacher_caches.get(tmp_path, owner="t2", key=middle)
    assert entry is not None
    teacher_caches.touch(entry)
    with teacher_caches.locked(tmp_path):
        assert teacher_caches.evict_to_fit(tmp_path, max_bytes=500) == [kept]
    assert [e.key for e in teacher_caches.entries(tmp_path, owner=None)] == [middle]
    touched = teacher_caches.get(tmp_path, owner="t2", key=middle)
    assert touched is not None and touched.meta["hits"] == 1


def test_a_jobs_caches_belong_to_its_tenant(make_client: Any, make_api_key: Any) -> None:
    """The worker files a job's caches under its tenant (workers.tasks asks owner_of_job)."""
    name = f"carol-{uuid.uuid4().hex[:8]}"
    client = make_client(headers=make_api_key(name))
    job = {
        "teacher_model_name": "digits-cnn",
        "target_compression": 0.25,
        "training_config": {"epochs": 1},
        "dataset_config": {"kind": "builtin", "name": "digits"},
    }
    created = client.post("/distillation/jobs", json=job)
    assert created.status_code == 201, created.text
    tenant_id = _tenant_id(name)  # its own session first: SQLite's write lock allows one at a time
    with session_scope() as session:
        assert teacher_caches.owner_of_job(session, job_id=created.json()["job_id"]) == tenant_id
        assert teacher_caches.owner_of_job(session, job_id="no-such-job") == teacher_caches.LOCAL_OWNER
