"""The /health answer: each dependency's state and the seed's job counts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ComponentHealth(BaseModel):
    status: Literal["ok", "down", "unknown"]
    detail: str = ""


class WorkersHealth(ComponentHealth):
    alive: int = Field(default=0, description="Workers that beat within HEARTBEAT_TIMEOUT")


class HealthRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "database": {"status": "ok", "detail": "postgresql"},
                    "broker": {"status": "ok", "detail": "redis"},
                    "scheduler": {"status": "ok", "detail": "last tick 1.2 s ago"},
                    "workers": {"status": "ok", "detail": "", "alive": 2},
                    "active_jobs": 1,
                    "total_jobs": 17,
                }
            ]
        }
    )

    status: Literal["ok", "degraded"] = Field(description="ok when every part is up")
    database: ComponentHealth
    broker: ComponentHealth
    scheduler: ComponentHealth
    workers: WorkersHealth
    active_jobs: int = Field(description="Jobs dispatched, running or cancelling")
    total_jobs: int
