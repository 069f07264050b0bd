"""Response model of uploaded datasets."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class DatasetRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": "0b6f3c1e-2a4d-4c59-8a57-5d0f6b7e9c21",
                    "name": "reviews.csv",
                    "format": "csv",
                    "size_bytes": 48213,
                    "num_rows": 1200,
                    "columns": ["text", "label"],
                    "num_labels": 2,
                    "sha256": "9f2c0d4e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d",
                    "created_at": "2026-11-29T03:01:12Z",
                }
            ]
        }
    )

    dataset_id: str
    name: str
    format: str = Field(description="csv | jsonl")
    size_bytes: int
    num_rows: int
    columns: list[str]
    num_labels: int | None = Field(description="max(label) + 1 when a `label` column is present")
    sha256: str
    created_at: datetime
