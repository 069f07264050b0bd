"""Shared by the browser tests: a live uvicorn server and Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import ROOT, live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_MISSING = (
    f"{CHROMIUM} is absent: `apt-get install -y chromium` (Debian's package) runs the browser tests"
)


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server() as url:
        yield url


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    # A dev dependency: missing it is an error, not a skip (the modules skip only without Chromium).
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
