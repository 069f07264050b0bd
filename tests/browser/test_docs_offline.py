"""/docs (Swagger UI) and /redoc render with the network cut off: their assets come from the server itself.

Every request to a host other than the test server is aborted and recorded; the pages must still show
the operations, and must not have tried to reach anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_MISSING

if not CHROMIUM.exists():
    pytest.skip(CHROMIUM_MISSING, allow_module_level=True)

SCREENSHOT = ARTIFACTS / "docs-offline.png"
# ReDoc's sidebar shows Redocly's logo from their CDN and hides the <img> when it fails to load (its
# onError): cosmetic, so the one request allowed to fail. Anything else blocked means a missing asset.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture()
def offline_page(chromium: Any) -> Iterator[tuple[Any, list[str]]]:
    """A page whose every request off 127.0.0.1 is aborted; yields it with the list of blocked URLs."""
    context = chromium.new_context(viewport={"width": 1280, "height": 1000})
    blocked: list[str] = []

    def route(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", route)
    try:
        yield context.new_page(), blocked
    finally:
        context.close()


def test_swagger_ui_renders_the_operations_offline(server: str, offline_page: tuple[Any, list[str]]) -> None:
    page, blocked = offline_page
    page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/distillation/jobs" in p for p in paths)
    assert page.locator(".opblock-tag", has_text="jobs").first.is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert blocked == []


def test_redoc_renders_the_operations_offline(server: str, offline_page: tuple[Any, list[str]]) -> None:
    page, blocked = offline_page
    page.goto(f"{server}/redoc")
    operation = page.get_by_role("heading", name="Create a distillation job").first
    operation.wait_for(timeout=15_000)
    assert operation.is_visible()
    assert page.locator("[role=menuitem]", has_text="jobs").first.is_visible()
    assert [url for url in blocked if url != REDOC_LOGO] == []
