"""The in-process key cache: a hot key skips the lookup, its bound on revocation elsewhere, and clearing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.db import session_scope
from app.models import ApiKey, utcnow
from app.services import auth

ClientFactory = Callable[..., TestClient]
ADMIN_KEY = "admin-" + uuid.uuid4().hex


def _revoke_behind_the_apis_back(key_id: str) -> None:
    """Revoke in the database only, as another API process (or `distillery` on another host) would."""
    with session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))


def _issue(make_client: ClientFactory) -> dict[str, Any]:
    admin = make_client(admin_api_key=ADMIN_KEY, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    issued: dict[str, Any] = admin.post("/admin/keys", json={"tenant": "cache", "name": "t"}).json()
    return issued


def test_a_key_revoked_elsewhere_is_refused_within_the_cache_ttl(
    make_client: ClientFactory, problem: Any
) -> None:
    issued = _issue(make_client)
    user = make_client(auth_cache_seconds=1.0, headers={"Authorization": f"Bearer {issued['key']}"})
    assert user.get("/distillation/jobs").status_code == 200  # accepted: now cached
    revoked_at = time.monotonic()
    _revoke_behind_the_apis_back(issued["id"])
    # Inside the TTL the cached principal still answers (the lookup is skipped: that is the cache).
    assert user.get("/distillation/jobs").status_code == 200
    deadline = revoked_at + 10.0
    while user.get("/distillation/jobs").status_code == 200:
        assert time.monotonic() < deadline, "a revoked key stayed accepted past the cache TTL"
        time.sleep(0.05)
    assert time.monotonic() - revoked_at >= 0.9  # refused only once the 1 s TTL ran out
    assert "revoked" in problem(user.get("/distillation/jobs"), 401)["detail"]


def test_with_the_cache_off_a_revocation_elsewhere_applies_at_once(
    make_client: ClientFactory, problem: Any
) -> None:
    issued = _issue(make_client)
    user = make_client(auth_cache_seconds=0, headers={"Authorization": f"Bearer {issued['key']}"})
    assert user.get("/distillation/jobs").status_code == 200
    _revoke_behind_the_apis_back(issued["id"])
    problem(user.get("/distillation/jobs"), 401)


def test_a_revocation_through_this_process_clears_the_cache_at_once(
    make_client: ClientFactory, problem: Any
) -> None:
    issued = _issue(make_client)
    user = make_client(auth_cache_seconds=60, headers={"Authorization": f"Bearer {issued['key']}"})
    assert user.get("/distillation/jobs").status_code == 200
    assert auth.cached_principal(issued["key"]) is not None
    admin = make_client(admin_api_key=ADMIN_KEY, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.delete(f"/admin/keys/{issued['id']}").status_code == 200
    assert auth.cached_principal(issued["key"]) is None
    problem(user.get("/distillation/jobs"), 401)


def test_unknown_keys_are_never_cached(make_client: ClientFactory, problem: Any) -> None:
    key = "dk_" + uuid.uuid4().hex
    problem(make_client(headers={"Authorization": f"Bearer {key}"}).get("/distillation/jobs"), 401)
    assert auth.cached_principal(key) is None


def test_the_cache_is_bounded() -> None:
    cache = auth.PrincipalCache(max_entries=3)
    principal = auth.Principal(tenant_id="t", tenant_name="t", key_id="k", key_prefix="dk_")
    for index in range(10):
        cache.put(f"hash-{index}", principal, 60)
    assert sum(cache.get(f"hash-{index}") is not None for index in range(10)) <= 3
    cache.put("expired", principal, 0)
    assert cache.get("expired") is None
