"""A generic cursor page: `{data, has_more, next_cursor}`."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    next_cursor: str | None = Field(
        default=None, description="Pass back as the cursor to get the next page; null at the end"
    )
