"""Teacher sources: where a named teacher comes from. Pure data, shared by the API registry and the engine."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class TeacherSourceKind(StrEnum):
    builtin = "builtin"  # built by the engine itself (digits-cnn)
    local = "local"  # a directory: save_pretrained output, or safetensors + config
    hub = "hub"  # a Hugging Face hub id, loaded with from_pretrained


class TeacherSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    kind: TeacherSourceKind
    location: str = Field(min_length=1, max_length=4096, description="builtin name, directory or hub id")
    type: str = Field(description="transformer | causal_lm | masked_lm | cnn", max_length=64)
    params: int | None = Field(default=None, ge=0, description="Parameter count, when known")
    task: str | None = Field(default=None, description="Task the teacher serves by default")
    description: str = ""


# The default registry: the seed's three plus the built-in digits teacher.
DEFAULT_TEACHERS: tuple[TeacherSource, ...] = (
    TeacherSource(
        name="digits-cnn",
        kind=TeacherSourceKind.builtin,
        location="digits-cnn",
        type="cnn",
        params=None,  # filled in by the engine once built; under 1M
        task="classification",
        description="A small CNN trained deterministically on scikit-learn's digits on first use.",
    ),
    TeacherSource(
        name="bert-large",
        kind=TeacherSourceKind.hub,
        location="bert-large-uncased",
        type="transformer",
        params=340_000_000,
        task="sequence-classification",
    ),
    TeacherSource(
        name="roberta-large",
        kind=TeacherSourceKind.hub,
        location="roberta-large",
        type="transformer",
        params=355_000_000,
        task="sequence-classification",
    ),
    TeacherSource(
        name="gpt2-medium",
        kind=TeacherSourceKind.hub,
        location="gpt2-medium",
        type="causal_lm",
        params=345_000_000,
        task="causal-lm",
    ),
)
