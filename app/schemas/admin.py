"""Request and response models of the admin API (tenant API keys)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

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


class ApiKeyRead(BaseModel):
    """A key as listed: never the secret, only its first characters."""

    id: str
    tenant: str
    tenant_id: str
    name: str
    prefix: str = Field(description="The key's first characters, to identify it")
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    """A new key: `key` is shown this once and cannot be retrieved later."""

    key: str = Field(description="The secret bearer key; store it now, it is not shown again")
