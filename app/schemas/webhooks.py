"""Request and response models of webhook endpoints and their deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WebhookEventType = Literal["job.completed", "job.failed", "job.cancelled", "job.paused"]
ALL_EVENTS: list[WebhookEventType] = ["job.completed", "job.failed", "job.cancelled", "job.paused"]


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"url": "https://hooks.example.com/distillery", "events": ["job.completed", "job.failed"]}
            ]
        },
    )

    url: str = Field(min_length=1, max_length=2048, description="http(s) URL that receives the POSTs")
    events: list[WebhookEventType] = Field(
        default_factory=lambda: list(ALL_EVENTS),
        min_length=1,
        max_length=len(ALL_EVENTS),
        description="Which job events to send (default: all four)",
    )
    description: str = Field(default="", max_length=500)


_ENDPOINT_EXAMPLE: dict[str, Any] = {
    "id": "3f6c1f0e-4b1a-4d8e-9a57-0c2a1f3e9b10",
    "url": "https://hooks.example.com/distillery",
    "events": ["job.completed", "job.failed"],
    "description": "CI notifications",
    "enabled": True,
    "created_at": "2026-12-01T10:00:00Z",
    "updated_at": "2026-12-01T10:00:00Z",
}


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"enabled": False}, {"events": ["job.failed"]}]}
    )

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    events: list[WebhookEventType] | None = Field(default=None, min_length=1, max_length=len(ALL_EVENTS))
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None


class WebhookEndpointRead(BaseModel):
    """An endpoint, without its secret (shown once, when created or rotated)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_ENDPOINT_EXAMPLE]})

    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpointRead):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [_ENDPOINT_EXAMPLE | {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]
        }
    )

    secret: str = Field(
        description="`whsec_` + base64 key for verifying signatures (Standard Webhooks). Shown only now: "
        "store it."
    )


class WebhookDeliveryRead(BaseModel):
    """One event for one endpoint and how its delivery went."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "msg_7f07506c5ed342bd82e07f5abadbe299",
                    "endpoint_id": _ENDPOINT_EXAMPLE["id"],
                    "job_id": "5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11",
                    "event_type": "job.completed",
                    "status": "delivered",
                    "attempts": 3,
                    "next_attempt_at": "2026-12-01T10:09:20Z",
                    "last_attempt_at": "2026-12-01T10:09:21Z",
                    "last_status_code": 200,
                    "last_error": None,
                    "delivered_at": "2026-12-01T10:09:21Z",
                    "created_at": "2026-12-01T10:09:18Z",
                    "payload": {
                        "type": "job.completed",
                        "timestamp": "2026-12-01T10:09:18Z",
                        "data": {"job_id": "5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11", "status": "completed"},
                    },
                }
            ]
        }
    )

    id: str = Field(description="The `webhook-id` header: the same on every retry (de-duplicate on it)")
    endpoint_id: str
    job_id: str
    event_type: str
    status: str = Field(description="pending | delivered | failed (gave up after WEBHOOK_RETRY_HOURS)")
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any]
