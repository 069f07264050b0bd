"""Job routes accept any unique id prefix (as git does), over real HTTP against a live server.

Ambiguous -> 409 listing the matches; none or too short -> 404; another tenant's jobs never match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import Job
from app.services.job_ids import MIN_PREFIX_LENGTH
from tests.live_server import live_server
from tests.sse_helpers import create_job, tenant_of


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server() as url:
        yield url


def _twin(job_id: str, tenant_id: str, *, nth: int) -> str:
    """A pending job of `tenant_id` whose id shares `job_id`'s first 12 characters; the 13th differs."""
    digits = [d for d in "0123456789abcdef" if d != job_id[12]]
    twin_id = job_id[:12] + digits[nth] + job_id[13:]
    with session_scope() as session:
        original = session.get(Job, job_id)
        assert original is not None
        session.add(
            Job(
                id=twin_id,
                spec=original.spec,
                teacher_model_name=original.teacher_model_name,
                status=original.status,
                attempt=0,
                progress=0.0,
                created_at=original.created_at,
                updated_at=original.updated_at,
                tenant_id=tenant_id,
            )
        )
    return twin_id


def test_every_job_route_resolves_a_unique_prefix_and_refuses_an_ambiguous_one(
    server: str,
    clean_database: str,
    auth_headers: dict[str, str],
    make_api_key: Callable[..., dict[str, str]],
) -> None:
    settings = Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))
    tenant = tenant_of(auth_headers)
    job_id = create_job(settings, tenant)
    other_headers = make_api_key()
    # Another tenant's job sharing the first 12 characters: must neither match nor make ours ambiguous.
    _twin(job_id, tenant_of(other_headers), nth=0)
    ours = httpx.Client(base_url=f"{server}/distillation/jobs", headers=auth_headers, timeout=10)

    short = job_id[:8]  # what the dashboard shows
    read = ours.get(f"/{short}")
    assert read.status_code == 200 and read.json()["job_id"] == job_id
    assert ours.get(f"/{short.upper()}").json()["job_id"] == job_id
    assert ours.get(f"/{job_id[:MIN_PREFIX_LENGTH]}").json()["job_id"] == job_id
    assert ours.get(f"/{short}/events").json()["data"][0]["message"] == "created"
    assert ours.get(f"/{short}/artifacts").json() == []
    download = ours.get(f"/{short}/artifacts/student.pt2")
    assert download.status_code == 404 and "student.pt2" in download.json()["detail"]

    # The twin of our own tenant makes the 8-character prefix ambiguous; 13 characters tell them apart.
    twin = _twin(job_id, tenant, nth=1)
    for method, path in (
        ("GET", f"/{short}"),
        ("GET", f"/{short}/events"),
        ("GET", f"/{short}/artifacts"),
        ("POST", f"/{short}/start"),
        ("POST", f"/{short}/cancel"),
        ("DELETE", f"/{short}"),
    ):
        ambiguous = ours.request(method, path)
        assert ambiguous.status_code == 409, (method, path, ambiguous.text)
        assert ambiguous.headers["content-type"].startswith("application/problem+json")
        body = ambiguous.json()
        assert sorted(body["matches"]) == sorted([job_id, twin]), body
        assert job_id in body["detail"] and twin in body["detail"]
    assert ours.get(f"/{job_id[:13]}").json()["job_id"] == job_id
    assert ours.get(f"/{twin[:13]}").json()["job_id"] == twin

    started = ours.post(f"/{twin[:13]}/start")  # the scheduler may dispatch it: not cancelled below
    assert started.status_code == 202 and started.json()["job_id"] == twin
    cancelled = ours.post(f"/{job_id[:13]}/cancel")  # pending: cancelled at once
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert ours.delete(f"/{job_id[:13]}").status_code == 204
    assert ours.get(f"/{job_id}").status_code == 404

    # None matches, too short, or only another tenant's: 404 problem+json, saying why.
    assert ours.get("/ffffffff").status_code == 404
    too_short = ours.get(f"/{twin[:3]}")
    assert too_short.status_code == 404 and "at least 4" in too_short.json()["detail"]
    theirs = httpx.get(f"{server}/distillation/jobs/{twin[:13]}", headers=other_headers, timeout=10)
    assert theirs.status_code == 404
    wildcard = ours.get("/____")  # LIKE wildcards are matched literally
    assert wildcard.status_code == 404
    ours.close()
