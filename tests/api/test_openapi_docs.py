"""/docs is a usable manual: each operation has a summary, its errors and valid examples."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from app.main import create_app
from app.schemas.admin import ApiKeyCreated, ApiKeyRead
from app.schemas.calculator import CalculatorResult
from app.schemas.datasets import DatasetRead
from app.schemas.health import HealthRead
from app.schemas.jobs import ArtifactRead, JobCreate, JobEventRead, JobRead, JobSummary
from app.schemas.results import DistillationResults
from app.schemas.teachers_api import TeacherRead

SPEC: dict[str, Any] = create_app().openapi()
COMPONENTS: dict[str, Any] = SPEC["components"]["schemas"]
OPERATIONS = [
    (method.upper(), path, operation)
    for path, methods in SPEC["paths"].items()
    for method, operation in methods.items()
]
# Bodies a JSON example cannot show.
NON_JSON = ("multipart/form-data", "application/octet-stream")


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return dict(COMPONENTS[schema["$ref"].rsplit("/", 1)[-1]])
    return schema


def _has_example(media: dict[str, Any]) -> bool:
    """An example on the media type, on its schema, or on the items of a list or a page."""
    if media.get("example") is not None or media.get("examples"):
        return True
    schema = _resolve(media.get("schema", {}))
    if schema.get("examples") or schema.get("example") is not None:
        return True
    if schema.get("type") == "array":
        return bool(_resolve(schema.get("items", {})).get("examples"))
    data = schema.get("properties", {}).get("data", {})
    return data.get("type") == "array" and bool(_resolve(data.get("items", {})).get("examples"))


@pytest.mark.parametrize(
    ("method", "path", "operation"), OPERATIONS, ids=[f"{m} {p}" for m, p, _ in OPERATIONS]
)
def test_operation_has_summary_errors_and_examples(method: str, path: str, operation: dict[str, Any]) -> None:
    assert operation.get("summary"), "no summary"
    responses: dict[str, Any] = operation["responses"]
    codes = {int(code) for code in responses if code.isdigit()}
    if operation.get("parameters") or operation.get("requestBody"):
        assert 422 in codes, "takes input but does not document 422"
    if any(p["in"] == "path" for p in operation.get("parameters", [])):
        assert 404 in codes, "has a path id but does not document 404"
    if operation.get("security"):
        assert 401 in codes, "needs a key but does not document 401"
    for code in codes:
        if code >= 400:
            assert "application/problem+json" in responses[str(code)].get("content", {}), (
                f"{code} not problem+json"
            )
            assert responses[str(code)].get("description"), f"{code} without a description"
    body = operation.get("requestBody", {}).get("content", {})
    for media_type, media in body.items():
        if media_type not in NON_JSON:
            assert _has_example(media), f"request {media_type} has no example"
    for code in codes:
        if 200 <= code < 300:
            for media_type, media in responses[str(code)].get("content", {}).items():
                if media_type not in NON_JSON:
                    assert _has_example(media), f"{code} {media_type} has no example"


def test_create_job_shows_a_whole_digits_job_and_the_reads_show_its_results() -> None:
    create = SPEC["paths"]["/distillation/jobs"]["post"]
    examples = create["requestBody"]["content"]["application/json"]["examples"]
    digits = JobCreate.model_validate(examples["digits"]["value"])
    assert digits.dataset_config.kind == "builtin" and digits.teacher_model_name == "digits-cnn"
    read_examples = COMPONENTS["JobRead"]["examples"]
    completed = [e for e in read_examples if e["status"] == "completed"]
    assert completed and completed[0]["results"]["training_history"]
    DistillationResults.model_validate(completed[0]["results"])
    stream = SPEC["paths"]["/distillation/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream and "application/json" in stream


@pytest.mark.parametrize(
    "model",
    [
        JobCreate,
        JobRead,
        JobSummary,
        JobEventRead,
        ArtifactRead,
        TeacherRead,
        DatasetRead,
        CalculatorResult,
        HealthRead,
        ApiKeyRead,
        ApiKeyCreated,
    ],
)
def test_schema_examples_are_valid(model: type[BaseModel]) -> None:
    examples = model.model_json_schema().get("examples", [])
    assert examples, f"{model.__name__} has no example"
    for example in examples:
        model.model_validate(example)
