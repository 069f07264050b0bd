"""Response model of uploaded datasets."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class DatasetRead(BaseModel):
    dataset_id: str
    name: str
    format: str = Field(description="csv | jsonl")
    size_bytes: int
    num_rows: int
    columns: list[str]
    num_labels: int | None = Field(description="max(label) + 1 when a `label` column is present")
    sha256: str
    created_at: datetime
