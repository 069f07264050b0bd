"""The dashboard: sign-in cookie flags, tenant-scoped pages, curves as inline SVG, CSRF on cancel."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import Job
from app.services import lifecycle
from tests.sse_helpers import (
    complete,
    create_job,
    report_epoch,
    results_for,
    start_and_claim,
    tenant_of,
    training_history,
)

ClientFactory = Callable[..., TestClient]


@pytest.fixture()
def settings(clean_database: str) -> Settings:
    return Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))


@pytest.fixture()
def browser(make_client: ClientFactory) -> TestClient:
    """A client without an Authorization header, as a browser is."""
    return make_client(headers={})


def _key(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _sign_in(browser: TestClient, headers: dict[str, str]) -> None:
    token = _csrf(browser.get("/signin").text)
    response = browser.post(
        "/signin", data={"api_key": _key(headers), "csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303 and response.headers["location"] == "/"


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def test_pages_need_sign_in_and_the_cookie_is_httponly_samesite_strict(
    browser: TestClient, auth_headers: dict[str, str]
) -> None:
    response = browser.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/signin"
    form = browser.get("/signin")
    assert form.status_code == 200 and 'name="api_key"' in form.text

    token = _csrf(form.text)
    refused = browser.post(
        "/signin", data={"api_key": "dk_not-a-key", "csrf_token": token}, follow_redirects=False
    )
    assert refused.status_code == 401 and "unknown or revoked" in refused.text
    assert "set-cookie" not in refused.headers

    accepted = browser.post(
        "/signin", data={"api_key": _key(auth_headers), "csrf_token": token}, follow_redirects=False
    )
    assert accepted.status_code == 303
    cookie = accepted.headers["set-cookie"]
    assert cookie.startswith("distillery_session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    page = browser.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_jobs_table_shows_own_jobs_with_status_and_progress_only(
    browser: TestClient,
    settings: Settings,
    auth_headers: dict[str, str],
    make_api_key: Callable[..., dict[str, str]],
) -> None:
    own = create_job(settings, tenant_of(auth_headers))
    claim = start_and_claim(settings, own)
    report_epoch(claim, 1, 4, accuracy=0.6, loss=1.1)
    other = create_job(settings, tenant_of(make_api_key()))
    _sign_in(browser, auth_headers)
    html = browser.get("/").text
    row = re.search(rf'<tr data-job-id="{own}">(.*?)</tr>', html, re.S)
    assert row, html
    assert "running" in row.group(1) and "width: 25.0%" in row.group(1) and "25%" in row.group(1)
    assert other not in html
    assert browser.get(f"/jobs/{other}").status_code == 404


def test_job_page_draws_one_curve_point_per_epoch_with_results_and_downloads(
    browser: TestClient, settings: Settings, auth_headers: dict[str, str]
) -> None:
    epochs = 5
    job_id = create_job(settings, tenant_of(auth_headers))
    claim = start_and_claim(settings, job_id)
    for epoch in range(1, 3):
        report_epoch(claim, epoch, epochs, accuracy=0.5 + 0.05 * epoch, loss=1.0 / epoch)
    _sign_in(browser, auth_headers)

    running = browser.get(f"/jobs/{job_id}").text  # while running: curves from the metric events so far
    assert re.search(r'<meta http-equiv="refresh"', running)
    loss = re.search(r'<polyline data-series="total_loss" points="([^"]*)"', running)
    assert loss and len(loss.group(1).split()) == 2

    complete(claim, epochs, {"student.safetensors": b"weights", "results.json": b"{}"})
    page = browser.get(f"/jobs/{job_id}").text
    assert "http-equiv" not in page  # finished: no more refreshing
    for series in ("total_loss", "distillation_loss", "student_loss", "student_accuracy"):
        points = re.search(rf'<polyline data-series="{series}" points="([^"]*)"', page)
        assert points, series
        assert len(points.group(1).split()) == epochs
    assert 'data-series="teacher_accuracy"' in page
    # Teacher vs the delivered student (results without `student_accuracy`: the best-validation one).
    assert re.search(r'<table id="results">.*Test accuracy.*98\.06%.*95\.83%', page, re.S)
    link = f'href="/jobs/{job_id}/artifacts/student.safetensors"'
    assert link in page
    download = browser.get(f"/jobs/{job_id}/artifacts/student.safetensors")
    assert download.status_code == 200 and download.content == b"weights"
    # Works offline: no script, stylesheet or image from anywhere else.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page


def test_cancel_needs_the_csrf_token_of_the_signed_in_key(
    browser: TestClient, settings: Settings, auth_headers: dict[str, str]
) -> None:
    job_id = create_job(settings, tenant_of(auth_headers))
    _sign_in(browser, auth_headers)
    token = _csrf(browser.get(f"/jobs/{job_id}").text)

    for data in ({}, {"csrf_token": "0" * 64}):
        refused = browser.post(f"/jobs/{job_id}/cancel", data=data, follow_redirects=False)
        assert refused.status_code == 403
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.status == "pending"

    done = browser.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/jobs/{job_id}"
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "cancelled"
    again = browser.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}, follow_redirects=False)
    assert again.status_code == 409 and "cancelled" in again.text


def test_signed_out_cookie_no_longer_opens_pages(browser: TestClient, auth_headers: dict[str, str]) -> None:
    _sign_in(browser, auth_headers)
    token = _csrf(browser.get("/").text)
    out = browser.post("/signout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303 and 'distillery_session=""' in out.headers["set-cookie"]
    assert browser.get("/", follow_redirects=False).status_code == 303


def test_the_short_id_the_jobs_table_shows_opens_the_job(
    browser: TestClient, settings: Settings, auth_headers: dict[str, str]
) -> None:
    job_id = create_job(settings, tenant_of(auth_headers))
    _sign_in(browser, auth_headers)
    listed = browser.get("/").text
    short = re.search(rf'<a href="/jobs/{job_id}" title="{job_id}"><code class="job-id">(\w+)</code>', listed)
    assert short and job_id.startswith(short.group(1))
    opened = browser.get(f"/jobs/{short.group(1)}", follow_redirects=False)
    assert opened.status_code == 307 and opened.headers["location"] == f"/jobs/{job_id}"
    assert (
        f'id="job-id" title="Click to select the whole id">{job_id}</code>'
        in browser.get(opened.headers["location"]).text
    )
    assert browser.get("/jobs/ffffffff").status_code == 404


def _perplexity_results(epochs: int, **fields: Any) -> dict[str, Any]:
    """A causal-LM job where KD lost: student perplexity 3.297 against a labels-only 3.207."""
    history = [
        {**entry, "student_accuracy": 40.0 / entry["epoch"] + 3.2} for entry in training_history(epochs)
    ]
    return results_for(epochs) | {
        "task": "causal-lm",
        "metric": "perplexity",
        "teacher_accuracy": 2.95,
        "final_student_accuracy": 3.31,
        "best_student_accuracy": 3.297,
        "accuracy_retention": 2.95 / 3.297,
        "baseline_accuracy": 3.207,
        "training_history": history,
        **fields,
    }


@pytest.mark.parametrize(
    "fields",
    [
        # As the engine wrote it before the contract: 100 * (student - baseline), whatever the metric.
        pytest.param({"kd_gain": 8.98}, id="old-results"),
        pytest.param(
            {
                "student_accuracy": 3.297,
                "selected_by": "last",
                "selected_epoch": 4,
                "metric_direction": "lower_is_better",
                "kd_gain": -0.09,
                "kd_gain_unit": "perplexity",
            },
            id="contract-fields",
        ),
    ],
)
def test_a_job_where_kd_lost_on_perplexity_says_kd_is_worse_and_lower_is_better(
    browser: TestClient, settings: Settings, auth_headers: dict[str, str], fields: dict[str, Any]
) -> None:
    epochs = 4
    job_id = create_job(settings, tenant_of(auth_headers))
    claim = start_and_claim(settings, job_id)
    complete(claim, epochs, results=_perplexity_results(epochs, **fields))
    _sign_in(browser, auth_headers)
    page = browser.get(f"/jobs/{job_id}").text
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))

    assert "Student perplexity (test, lower is better)" in text
    assert re.search(r'id="student-accuracy">3\.297<', page)
    assert "KD vs labels-only baseline: -0.09 test perplexity (KD worse, lower is better)" in text
    assert "+8.98" not in text and "points" not in text
    how = "the last epoch (epoch 4)" if fields.get("selected_by") == "last" else "best validation perplexity"
    assert how in text
    assert "Validation perplexity per epoch (lower is better)" in text
    assert "Test perplexity (lower is better)" in text


def test_a_running_jobs_page_draws_the_baseline_run_beside_the_kd_run_from_its_events(
    browser: TestClient, settings: Settings, auth_headers: dict[str, str]
) -> None:
    job_id = create_job(settings, tenant_of(auth_headers))
    claim = start_and_claim(settings, job_id)
    with session_scope() as session:
        for epoch in (1, 2, 3):  # the labels-only run goes first, as the runner orders the phases
            lifecycle.record_event(
                session,
                job_id=job_id,
                kind="metric",
                message=f"baseline stage 1 epoch {epoch}/3",
                data={"phase": "baseline", "stage": 1, "epoch": epoch, "student_accuracy": 0.5 + epoch / 10},
                attempt=claim.attempt,
            )
    _sign_in(browser, auth_headers)
    during_baseline = browser.get(f"/jobs/{job_id}").text  # no KD epoch yet: the baseline's curve alone
    alone = re.search(r'<polyline data-series="baseline_accuracy" points="([^"]*)"', during_baseline)
    assert alone and len(alone.group(1).split()) == 3
    assert 'data-series="student_accuracy"' not in during_baseline
    for epoch in (1, 2):
        report_epoch(claim, epoch, 3, accuracy=0.6 + epoch / 10, loss=1.0 / epoch)
    page = browser.get(f"/jobs/{job_id}").text
    kd = re.search(r'<polyline data-series="student_accuracy" points="([^"]*)"', page)
    baseline = re.search(r'<polyline data-series="baseline_accuracy" points="([^"]*)"', page)
    assert kd and len(kd.group(1).split()) == 2  # KD epochs 1-2 so far, the baseline's 1-3
    assert baseline and len(baseline.group(1).split()) == 3
    assert "labels-only baseline, validation accuracy" in page
    assert 'id="headline"' not in page  # no results yet: no headline figure
