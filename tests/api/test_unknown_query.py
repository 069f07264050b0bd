"""Query parameters an operation does not take are refused (a misspelt filter must not list everything)."""

from __future__ import annotations

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
