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


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    events: list[WebhookEventType] | None = Field(default=None, min_length=1, max_length=len(ALL_EVENTS))
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None


class WebhookEndpointRead(BaseModel):
    """An endpoint, without its secret (shown once, when created or rotated)."""

    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpointRead):
    secret: str = Field(
        description="`whsec_` + base64 key for verifying signatures (Standard Webhooks). Shown only now: "
        "store it."
    )


class WebhookDeliveryRead(BaseModel):
    """One event for one endpoint and how its delivery went."""

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
