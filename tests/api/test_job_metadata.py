"""Job names and metadata: stored, bounded (422 naming the field), shown, and filterable in lists."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "training_config": {"epochs": 2, "batch_size": 32},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}


def _create(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/distillation/jobs", json=DIGITS | fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_name_and_metadata_are_stored_shown_and_kept_out_of_the_spec(client: TestClient) -> None:
    job = _create(client, name="kd sweep t=4", metadata={"team": "vision", "run": "7"})
    assert job["name"] == "kd sweep t=4" and job["metadata"] == {"team": "vision", "run": "7"}
    assert "metadata" not in job["spec"] and "name" not in job["spec"]
    read = client.get(f"/distillation/jobs/{job['job_id']}").json()
    assert read["name"] == job["name"] and read["metadata"] == job["metadata"]
    listed = client.get("/distillation/jobs").json()["data"]
    assert [(j["name"], j["metadata"]) for j in listed] == [(job["name"], job["metadata"])]
    plain = _create(client)
    assert plain["name"] is None and plain["metadata"] == {}


def test_lists_filter_by_name_and_every_metadata_pair(client: TestClient) -> None:
    a = _create(client, name="a", metadata={"team": "vision", "stage": "dev"})
    b = _create(client, name="b", metadata={"team": "vision", "stage": "prod"})
    _create(client, name="c", metadata={"team": "nlp"})

    def ids(query: str) -> list[str]:
        response = client.get(f"/distillation/jobs?{query}")
        assert response.status_code == 200, response.text
        return [j["job_id"] for j in response.json()["data"]]

    assert ids("metadata[team]=vision") == [b["job_id"], a["job_id"]]
    assert ids("metadata[team]=vision&metadata[stage]=dev") == [a["job_id"]]
    assert ids("metadata[team]=vision&name=b") == [b["job_id"]]
    assert ids("metadata[missing]=x") == []
    assert ids("name=c&metadata[team]=vision") == []


def test_other_tenants_metadata_does_not_match(make_client: Any, make_api_key: Any) -> None:
    mine = make_client()
    theirs = make_client(headers=make_api_key())
    _create(theirs, metadata={"team": "vision"})
    assert mine.get("/distillation/jobs?metadata[team]=vision").json()["data"] == []


def test_metadata_bounds_answer_422_naming_the_field(client: TestClient, problem: Any) -> None:
    too_many = {f"k{i}": "v" for i in range(17)}
    cases = [
        {"metadata": too_many},
        {"metadata": {"bad key": "v"}},
        {"metadata": {"k" * 65: "v"}},
        {"metadata": {"k": "v" * 513}},
        {"metadata": {"k": 3}},
        {"metadata": ["k", "v"]},
        {"name": ""},
        {"name": "n" * 257},
    ]
    for fields in cases:
        body = problem(client.post("/distillation/jobs", json=DIGITS | fields), 422)
        field = next(iter(fields))
        assert field in body["detail"], (fields, body["detail"])
    assert len(_create(client, metadata={f"k{i}": "v" * 512 for i in range(16)})["metadata"]) == 16


def test_malformed_metadata_filters_answer_422(client: TestClient, problem: Any) -> None:
    for query in ("metadata=x", "metadata[]=x", "metadata[bad key]=x", "metadata[k]=a&metadata[k]=b"):
        body = problem(client.get(f"/distillation/jobs?{query}"), 422)
        assert "metadata" in body["detail"], (query, body)
