"""The /health answer: each dependency's state and the seed's job counts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ComponentHealth(BaseModel):
    status: Literal["ok", "down", "unknown"]
    detail: str = ""


class WorkersHealth(ComponentHealth):
    alive: int = Field(default=0, description="Workers that beat within HEARTBEAT_TIMEOUT")


class HealthRead(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="ok when every part is up")
    database: ComponentHealth
    broker: ComponentHealth
    scheduler: ComponentHealth
    workers: WorkersHealth
    active_jobs: int = Field(description="Jobs dispatched, running or cancelling")
    total_jobs: int
