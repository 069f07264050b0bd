"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): sign in, open a
finished job, check its curves, cancel another job; saves a screenshot to test-artifacts/dashboard.png."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.core.config import Settings, get_settings
from tests.browser.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_MISSING
from tests.sse_helpers import complete, create_job, report_epoch, start_and_claim, tenant_of

if not CHROMIUM.exists():
    pytest.skip(CHROMIUM_MISSING, allow_module_level=True)

SCREENSHOT = ARTIFACTS / "dashboard.png"
EPOCHS = 6


def test_signed_in_user_sees_the_curves_of_a_finished_job_and_cancels_another(
    server: str,
    chromium: Any,
    clean_database: str,
    auth_headers: dict[str, str],
    make_api_key: Callable[..., dict[str, str]],
) -> None:
    settings = Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))
    tenant = tenant_of(auth_headers)
    finished = create_job(settings, tenant)
    claim = start_and_claim(settings, finished)
    for epoch in range(1, EPOCHS + 1):
        report_epoch(claim, epoch, EPOCHS, accuracy=0.5 + 0.07 * epoch, loss=1.5 / epoch)
    complete(claim, EPOCHS, {"student.safetensors": b"weights", "results.json": b"{}"})
    pending = create_job(settings, tenant)
    create_job(settings, tenant_of(make_api_key()))  # another tenant's: never shown

    context = chromium.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    try:
        page.goto(f"{server}/")
        assert page.url.endswith("/signin")
        page.fill("input[name=api_key]", auth_headers["Authorization"].removeprefix("Bearer "))
        page.click("button[type=submit]")
        page.wait_for_selector("table#jobs")
        rows = page.locator("table#jobs tbody tr")
        assert rows.count() == 2
        cookies = {c["name"]: c for c in context.cookies()}
        session_cookie = cookies["distillery_session"]
        assert session_cookie["httpOnly"] is True and session_cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts

        page.click(f'tr[data-job-id="{finished}"] a')
        page.wait_for_selector("svg.chart polyline")
        assert page.inner_text("#job-status") == "completed"
        counts = page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll('svg.chart polyline')]
                   .map(p => [p.dataset.series, p.points.numberOfItems]))"""
        )
        assert counts["total_loss"] == EPOCHS and counts["student_accuracy"] == EPOCHS
        assert page.locator("table#results").is_visible()
        assert page.locator("#artifacts a").count() == 2
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.goto(f"{server}/jobs/{pending}")
        page.click("#cancel-form button")
        page.wait_for_selector("#job-status")
        assert page.inner_text("#job-status") == "cancelled"
    finally:
        context.close()
    assert SCREENSHOT.stat().st_size > 10_000
