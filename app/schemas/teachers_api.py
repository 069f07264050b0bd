"""Request and response models of the teachers registry (the source itself is `teachers.TeacherSource`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.core.paths import check_path_text
from app.schemas.hub_ids import check_hub_repo_id
from app.schemas.job_spec import Task

# "program": a torch.export archive (.pt2) whose output is logits; "mlp"/"cnn": classification models.
TeacherType = Literal["transformer", "causal_lm", "masked_lm", "cnn", "mlp", "program"]


class TeacherCreate(BaseModel):
    """Register a model (teacher or student): a local directory or `.pt2` file under the allowed root, or a
    Hugging Face hub id."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "my-bert", "kind": "local", "location": "models/my-bert", "type": "transformer"},
                {
                    "name": "distilgpt2",
                    "kind": "hub",
                    "location": "distilbert/distilgpt2",
                    "type": "causal_lm",
                },
            ]
        },
    )

    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Registry name used as teacher_model_name: letters, digits, '.', '_', '-'",
    )
    kind: Literal["local", "hub"]
    location: str = Field(
        min_length=1,
        max_length=4096,
        description="local: a save_pretrained directory, a directory of safetensors + student_config.json, "
        "or a torch.export .pt2 file, relative to the file root (ALLOWED_FILE_ROOT; refused when none is "
        "set); hub: a hub id, 'name' or 'org/name'",
    )
    type: TeacherType
    task: Task | None = None
    params: int | None = Field(
        strict=True, default=None, ge=0, le=10**13, description="Parameter count, when known"
    )
    description: str = Field(default="", max_length=2000)

    @field_validator("location")
    @classmethod
    def _location_form(cls, value: str, info: ValidationInfo) -> str:
        """A hub id by the hub's rules, or a plain path (no NUL, control characters or '~')."""
        if info.data.get("kind") == "hub":
            return check_hub_repo_id(value)
        check_path_text(value)
        return value


class TeacherRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits-cnn",
                    "kind": "builtin",
                    "location": "digits-cnn",
                    "type": "cnn",
                    "params": 120906,
                    "task": "classification",
                    "description": "A small CNN trained on the digits train split on first use",
                    "builtin": True,
                    "available_offline": True,
                    "created_at": "2026-11-29T02:00:00Z",
                }
            ]
        }
    )

    name: str
    kind: str = Field(description="builtin | local | hub")
    location: str
    type: str
    params: int | None
    task: str | None
    description: str
    builtin: bool = Field(description="Seeded from the default registry")
    available_offline: bool = Field(
        description="Loadable without network: built-in, or a local directory that exists"
    )
    created_at: datetime
