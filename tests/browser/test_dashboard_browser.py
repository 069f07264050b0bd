"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): sign in, open a
finished job by its short id, read its headline and curves, cancel another job; saves a screenshot of the
job page to test-artifacts/dashboard.png."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from app.core.config import Settings, get_settings
from tests.browser.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_MISSING
from tests.sse_helpers import (
    complete,
    create_job,
    report_epoch,
    results_for,
    start_and_claim,
    tenant_of,
)

if not CHROMIUM.exists():
    pytest.skip(CHROMIUM_MISSING, allow_module_level=True)

SCREENSHOT = ARTIFACTS / "dashboard.png"
EPOCHS = 12
# A digits run as the engine reports it: epoch 1's loss is ~20x epoch 12's; validation accuracy climbs
# from 0.80 to ~0.98, the labels-only baseline run a little lower.
KD_ACCURACY = [0.80, 0.90, 0.93, 0.95, 0.96, 0.965, 0.97, 0.975, 0.972, 0.98, 0.978, 0.979]
BASELINE_ACCURACY = [0.70, 0.84, 0.89, 0.91, 0.925, 0.935, 0.94, 0.945, 0.95, 0.952, 0.955, 0.954]
TOTAL_LOSS = [2.4, 0.62, 0.33, 0.21, 0.16, 0.14, 0.125, 0.118, 0.112, 0.108, 0.105, 0.103]
SELECTED_EPOCH = 10


def digits_results() -> dict[str, Any]:
    """A finished digits KD job's results with the delivered-student fields and the baseline's curve."""

    def entry(epoch: int, accuracy: float, loss: float) -> dict[str, Any]:
        return {
            "stage": 1,
            "epoch": epoch,
            "student_accuracy": accuracy,
            "total_loss": loss,
            "distillation_loss": loss * 0.7,
            "student_loss": loss * 0.3,
            "seconds": 0.5,
        }

    return results_for(EPOCHS) | {
        "teacher_accuracy": 0.9889,
        "student_accuracy": 0.9861,
        "selected_by": "best_validation",
        "selected_epoch": SELECTED_EPOCH,
        "metric_direction": "higher_is_better",
        "metric_split": "test",
        "final_student_accuracy": 0.9778,
        "best_student_accuracy": 0.9861,
        "accuracy_retention": 0.9972,
        "baseline_accuracy": 0.9583,
        "kd_gain": 2.78,
        "kd_gain_unit": "points",
        "training_history": [
            entry(e, a, loss) for e, (a, loss) in enumerate(zip(KD_ACCURACY, TOTAL_LOSS, strict=True), 1)
        ],
        "baseline_history": [
            entry(e, a, loss * 0.8)
            for e, (a, loss) in enumerate(zip(BASELINE_ACCURACY, TOTAL_LOSS, strict=True), 1)
        ],
    }


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
    complete(
        claim, EPOCHS, {"student.safetensors": b"weights", "results.json": b"{}"}, results=digits_results()
    )
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

        short = page.inner_text(f'tr[data-job-id="{finished}"] a code')
        assert len(short) < len(finished) and finished.startswith(short)
        assert page.get_attribute(f'tr[data-job-id="{finished}"] a', "title") == finished
        page.goto(f"{server}/jobs/{short}")  # the short id the table shows opens the job
        page.wait_for_selector("svg.chart polyline")
        assert page.url.endswith(f"/jobs/{finished}")
        assert page.inner_text("#job-id") == finished
        assert page.inner_text("#job-status") == "completed"

        # The headline is the delivered student, says how it was chosen, and names every comparison.
        assert page.inner_text("#student-accuracy") == "98.61%"
        assert "Student accuracy (test)" in page.inner_text("#headline")
        selected = page.inner_text("#selected-by")
        assert "best validation accuracy" in selected and f"epoch {SELECTED_EPOCH}" in selected
        comparisons = page.inner_text("#comparisons")
        assert "KD vs labels-only baseline: +2.78 points of test accuracy (KD better)" in comparisons
        assert "teacher: 98.89% test accuracy" in comparisons

        charts = page.evaluate(
            """() => [...document.querySelectorAll('svg.chart')].map(svg => ({
                 log: svg.dataset.logScale,
                 title: svg.querySelector('.y-title').textContent,
                 xTitle: svg.querySelector('.x-title').textContent,
                 top: svg.querySelector('rect').y.baseVal.value,
                 height: svg.querySelector('rect').height.baseVal.value,
                 ticks: [...svg.querySelectorAll('.y-tick')].map(t => t.textContent),
                 series: Object.fromEntries([...svg.querySelectorAll('polyline')].map(p => [p.dataset.series,
                   [...Array(p.points.numberOfItems).keys()].map(i => p.points.getItem(i).y)])),
                 legend: svg.parentElement.querySelector('.legend').innerText,
                 markers: svg.querySelectorAll('circle.marker').length}))"""
        )
        loss, accuracy = charts
        assert loss["log"] == "true" and loss["title"] == "loss (log scale)" and loss["xTitle"] == "epoch"
        assert len(loss["series"]["total_loss"]) == EPOCHS
        # Epochs 5-12 are not flattened onto the axis by epoch 1: on a linear 0.03-2.4 axis they would span
        # 2.4% of the plot height, on the log axis about 9%.
        later = loss["series"]["total_loss"][4:]
        assert max(later) - min(later) > 0.07 * loss["height"]
        assert "total loss" in loss["legend"] and "distillation loss" in loss["legend"]

        assert accuracy["log"] == "false" and accuracy["title"] == "validation accuracy"
        ticks = [float(t.rstrip("%")) for t in accuracy["ticks"]]
        assert 60 <= ticks[0] < 80 and ticks[-1] <= 100  # fitted to 0.70-0.98, not 0-1
        kd, baseline = accuracy["series"]["student_accuracy"], accuracy["series"]["baseline_accuracy"]
        assert len(kd) == EPOCHS and len(baseline) == EPOCHS
        # 0.93-0.98 is readable: 5% of the plot height on a 0-1 axis, here over 12%.
        assert max(kd[2:]) - min(kd[2:]) > 0.12 * accuracy["height"]
        assert all(k < b for k, b in zip(kd, baseline, strict=True))  # KD above (smaller y) the baseline
        legend = accuracy["legend"]
        assert "KD student, validation accuracy" in legend
        assert "labels-only baseline, validation accuracy" in legend
        assert "teacher, test accuracy" in legend and "delivered: epoch 10 (best validation)" in legend
        assert accuracy["markers"] == 1

        # The results in words with units, no snake_case keys.
        tables = page.inner_text("#results") + "\n" + page.inner_text("#summary")
        assert not re.search(r"\b[a-z0-9]+_[a-z0-9_]+\b", tables), tables
        for unit in ("%", "MiB", "(ms)", "points", " s"):
            assert unit in tables, unit
        assert "120,000" in tables  # parameters with thousands separators
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
