"""Query parameters an operation does not take are refused (a misspelt filter must not list everything)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient


def test_misspelt_list_filter_is_a_422_naming_it_and_the_valid_ones(client: TestClient) -> None:
    response = client.get("/distillation/jobs", params={"stauts": "completed"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["errors"][0]["field"] == "stauts"
    assert "status" in body["detail"] and "metadata[key]" in body["detail"]


def test_declared_parameters_and_metadata_filters_still_work(client: TestClient) -> None:
    ok = client.get("/distillation/jobs", params={"status": "completed", "limit": 5, "metadata[team]": "x"})
    assert ok.status_code == 200, ok.text
    assert client.get("/distillation/teachers", params={"nope": "1"}).status_code == 422


def test_every_api_operation_refuses_unknown_parameters_before_anything_else(client: TestClient) -> None:
    """Each router of the API builds its routes as CheckedQueryRoute; a new router that forgot would
    silently accept misspelt parameters. The 422 comes first: without any key, an unknown parameter is
    named before the 401."""
    from app.api.deps import CheckedQueryRoute

    def routes(entries: list[Any]) -> Iterator[Any]:
        for entry in entries:  # FastAPI keeps an included router as one entry holding the original
            yield from routes(entry.original_router.routes) if hasattr(entry, "original_router") else [entry]

    api_routes = [
        route
        for route in routes(client.app.routes)  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.path.startswith(("/distillation", "/admin", "/health"))
    ]
    assert len(api_routes) > 30
    assert [r.path for r in api_routes if not isinstance(r, CheckedQueryRoute)] == []
    anonymous = TestClient(client.app)  # type: ignore[arg-type]
    refused = anonymous.get("/distillation/jobs/some-job", params={"verbose": "1"})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "verbose"
    assert anonymous.get("/distillation/jobs/some-job").status_code == 401
