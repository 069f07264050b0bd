"""The RFC 9457 problem document, for OpenAPI: every error response has this shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FieldError(BaseModel):
    loc: list[int | str] = Field(
        description="Where the bad value is, e.g. ['body', 'training_config', 'epochs']"
    )
    field: str = Field(description="The same location as a dotted path")
    msg: str = Field(description="What is wrong, with the bound that was broken")
    type: str


class Problem(BaseModel):
    """An error: `type`, `title`, `status`, `detail`, `instance`, plus extras (`errors`, `valid_teachers`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None


_DESCRIPTIONS = {
    401: "Missing, unknown or revoked API key (send `Authorization: Bearer <key>`)",
    403: "Forbidden (admin endpoints when ADMIN_API_KEY is not set)",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the resource's current state",
    413: "Upload larger than MAX_UPLOAD_BYTES",
    422: "Invalid request: each bad field is named with its bound",
    429: "Too many queued jobs; retry after the Retry-After header's seconds",
    503: "Database unavailable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting problem+json errors for `statuses`."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(statuses):
        entry: dict[str, Any] = {
            "model": Problem,
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": {"application/problem+json": {}},
        }
        if status == 401:
            entry["headers"] = {
                "WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}
            }
        if status == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            }
        responses[status] = entry
    return responses
