"""A kept checkpoint of a job, as listed by GET /distillation/jobs/{id}/checkpoints."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class CheckpointRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "best",
                    "kind": "best",
                    "stage": 1,
                    "epoch": 7,
                    "metric": "accuracy",
                    "metric_split": "validation",
                    "validation_metric": 0.9514,
                    "created_at": "2026-12-01T10:20:31Z",
                    "bytes": 43864,
                    "url": "/distillation/jobs/5b0f4c8e-8d3a-4a53-9d7c-2f1f0b6f4a11/checkpoints/best",
                }
            ]
        }
    )

    name: str = Field(description="last, best, epoch-N (stage-K-epoch-N in progressive jobs)")
    kind: str = Field(description="last | best | epoch")
    stage: int
    epoch: int = Field(description="Epochs trained when it was taken (within its stage)")
    metric: str = Field(description="The task metric (accuracy: higher is better; perplexity: lower)")
    metric_split: str = "validation"
    validation_metric: float | None = Field(description="The metric on the validation split at that epoch")
    created_at: datetime
    bytes: int = Field(description="Size of the student weights file")
    url: str = Field(description="Download the student weights (safetensors)")
