"""Request and response models of the admin API (tenant API keys)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ApiKeyCreate(BaseModel):
    """Issue a key for a tenant (the tenant is created on its first key)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"tenant": "acme", "name": "ci-pipeline"}]}
    )

    tenant: str = Field(
        min_length=1, max_length=100, pattern=_NAME_PATTERN, description="Tenant name: letters, digits, . _ -"
    )
    name: str = Field(min_length=1, max_length=100, description="What the key is for, to tell keys apart")


_KEY_EXAMPLE: JsonDict = {
    "id": "7d1e2f30-4a5b-4c6d-8e9f-0a1b2c3d4e5f",
    "tenant": "acme",
    "tenant_id": "c0ffee00-1234-4abc-9def-0123456789ab",
    "name": "ci-pipeline",
    "prefix": "dk_Q3vN8xTb",
    "created_at": "2026-11-29T02:30:00Z",
    "revoked_at": None,
}


class ApiKeyRead(BaseModel):
    """A key as listed: never the secret, only its first characters."""

    model_config = ConfigDict(json_schema_extra={"examples": [_KEY_EXAMPLE]})

    id: str
    tenant: str
    tenant_id: str
    name: str
    prefix: str = Field(description="The key's first characters, to identify it")
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    """A new key: `key` is shown this once and cannot be retrieved later."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [_KEY_EXAMPLE | {"key": "dk_Q3vN8xTbR2mYc7LwK9pZfH4sJ6dA1gE5uV0oI8nB3qX"}]
        }
    )

    key: str = Field(description="The secret bearer key; store it now, it is not shown again")
