"""API views of teacher-signal caches (see app/services/teacher_caches.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue

_EXAMPLE: dict[str, JsonValue] = {
    "key": "3f1c2a9be0d84c61a7f3b2c1d0e9f8a7",
    "teacher_name": "gpt2-medium",
    "task": "causal-lm",
    "top_k": 64,
    "tail": False,
    "max_seq_length": 256,
    "examples": 20000,
    "tokens": 3100000,
    "bytes": 1193500000,
    "bytes_per_token": 385.0,
    "teacher_seconds": 412.7,
    "hits": 3,
    "created_at": 1796112000.0,
    "last_used_at": 1796119200.0,
}


class TeacherCacheRead(BaseModel):
    """One cache: the top-k teacher logits of one tokenised dataset, reusable by later jobs."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [_EXAMPLE]})

    key: str = Field(
        description="sha256 prefix of teacher weights + tokenised train split + max_seq_length + k"
    )
    teacher_name: str
    task: str
    top_k: int = Field(description="Logits kept per token")
    tail: bool = Field(description="Whether the mass outside the top k is kept as one extra bin")
    max_seq_length: int
    examples: int
    tokens: int = Field(description="Real (non-padding) tokens cached")
    bytes: int = Field(description="Bytes on disk")
    bytes_per_token: float
    teacher_seconds: float = Field(description="Seconds the teacher pass took when the cache was built")
    hits: int = Field(description="Jobs that reused it")
    created_at: float = Field(description="Unix time")
    last_used_at: float = Field(description="Unix time of the last build or reuse (LRU eviction order)")


class TeacherCachePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_EXAMPLE], "total_bytes": 1193500000, "max_bytes": 21474836480}]
        }
    )

    items: list[TeacherCacheRead]
    total_bytes: int = Field(description="Bytes of your caches")
    max_bytes: int = Field(description="TEACHER_SIGNAL_CACHE_MAX_BYTES: the bound over every tenant's caches")
