"""The job page of a retention-search job in a real headless Chromium: the accuracy-vs-size curve with
the target line and the delivered size, the trials table and the spread over seeds, from the results of a
real digits search run here. Saves the page to test-artifacts/search-curve.png (and to
/work/issue-texts/screens/ when that folder exists)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings, get_settings
from app.schemas.job_spec import JobSpec
from tests.browser.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_MISSING
from tests.sse_helpers import complete, create_job, start_and_claim, tenant_of

if not CHROMIUM.exists():
    pytest.skip(CHROMIUM_MISSING, allow_module_level=True)

SCREENSHOT = ARTIFACTS / "search-curve.png"
ISSUE_SCREENS = Path("/work/issue-texts/screens")
TARGET = 0.95
JOB = {
    "teacher_model_name": "digits-cnn",
    "target_retention": TARGET,
    "training_config": {"epochs": 4, "learning_rate": 0.02, "device": "cpu", "seeds": [0, 1, 2]},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}


def searched_results(tmp_path: Path) -> dict[str, Any]:
    """A real search on digits (a few seconds): trials, the size trained fully over three seeds."""
    import torch

    from workers.distill.contract import JobPaths
    from workers.distill.runner import resolve_teacher, run_job

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_job(
            JobSpec.model_validate(JOB),
            teacher=resolve_teacher("digits-cnn"),
            paths=JobPaths(tmp_path / "job"),
            data_dir=Path(os.environ["DATA_DIR"]),
        )
    finally:
        torch.set_num_threads(previous)
    return results.model_dump(mode="json")


def test_search_job_page_draws_the_size_curve_target_and_seed_spread(
    server: str, chromium: Any, clean_database: str, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    results = searched_results(tmp_path)
    assert results["target_met"] is True and len(results["trials"]) >= 2
    settings = Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))
    job_id = create_job(settings, tenant_of(auth_headers), target_compression=None, target_retention=TARGET)
    claim = start_and_claim(settings, job_id)
    complete(claim, 4, {"results.json": b"{}"}, results=results)

    context = chromium.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    try:
        page.goto(f"{server}/signin")
        page.fill("input[name=api_key]", auth_headers["Authorization"].removeprefix("Bearer "))
        page.click("button[type=submit]")
        page.wait_for_selector("table#jobs")
        page.goto(f"{server}/jobs/{job_id}")
        page.wait_for_selector("svg.chart polyline")

        curve = page.evaluate(
            """() => {
              const svg = [...document.querySelectorAll('svg.chart')]
                .find(s => s.querySelector('.x-title').textContent.startsWith('student parameters'));
              if (!svg) return null;
              const ys = name => {
                const p = svg.querySelector(`polyline[data-series="${name}"]`);
                return p ? [...Array(p.points.numberOfItems).keys()].map(i => p.points.getItem(i)) : null;
              };
              return {
                title: svg.parentElement.querySelector('figcaption').textContent,
                validation: ys('validation_retention').map(p => [p.x, p.y]),
                target: ys('target').map(p => p.y),
                dots: svg.querySelectorAll('circle.dot[data-series="validation_retention"]').length,
                markers: [...svg.querySelectorAll('circle.marker')]
                  .map(c => [c.cx.baseVal.value, c.cy.baseVal.value]),
                legend: svg.parentElement.querySelector('.legend').innerText,
                xticks: svg.querySelectorAll('text').length,
              };
            }"""
        )
        assert curve is not None, "no accuracy-vs-size chart on the page"
        trials = sorted(results["trials"], key=lambda t: t["parameters"])
        assert len(curve["validation"]) == len(trials) and curve["dots"] == len(trials)
        xs = [x for x, _ in curve["validation"]]
        assert xs == sorted(xs)  # points ordered by size, left to right
        # The target is one horizontal line; points that meet the target sit on or above it (smaller y).
        assert len(set(curve["target"])) == 1
        target_y = curve["target"][0]
        for (_, y), trial in zip(curve["validation"], trials, strict=True):
            assert (y <= target_y + 0.5) == trial["meets_target"]
        assert len(curve["markers"]) == 1
        assert f"{results['compressed_parameters']:,} parameters trained fully" in curve["legend"]
        assert "target 95.0%" in curve["legend"] and "validation retention (decides)" in curve["legend"]

        assert "Target retention 95.00%: met" in page.inner_text("#target-verdict")
        assert page.locator("table#trials tbody tr").count() == len(results["trials"])
        assert page.locator("table#trials tr.chosen").count() == 1
        spread = page.inner_text("table#seed-spread")
        mean = results["seed_summary"]["student_accuracy"]["mean"]
        assert f"{100 * mean:.2f}%" in spread and "Retention of the teacher's accuracy" in spread
        page.locator("#search").scroll_into_view_if_needed()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        if ISSUE_SCREENS.is_dir():
            shutil.copyfile(SCREENSHOT, ISSUE_SCREENS / "search-curve.png")
    finally:
        context.close()
