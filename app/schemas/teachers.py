"""Teacher sources: where a named teacher comes from. Pure data, shared by the API registry and the engine."""

from __future__ import annotations

import math
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


def digits_cnn_parameters(
    in_features: int = 64, num_classes: int = 10, channels: int = 16, hidden: int = 1500
) -> int:
    """Parameters of the engine's built-in DigitsCNN (workers/distill/models.py), counted without torch.

    conv1 1->C 3x3, conv2 C->2C 3x3 (after a 2x2 pool), fc1 2C*(S/2)^2 -> hidden, fc2 hidden -> classes,
    each with a bias; S*S = in_features. tests/engine/test_digits_cnn_parameters.py checks it against the
    model's own count, so the registry cannot drift from the architecture.
    """
    side = math.isqrt(in_features)
    conv1 = 1 * channels * 9 + channels
    conv2 = channels * 2 * channels * 9 + 2 * channels
    fc1 = 2 * channels * (side // 2) ** 2 * hidden + hidden
    fc2 = hidden * num_classes + num_classes
    return conv1 + conv2 + fc1 + fc2


# The default registry: the seed's three plus the built-in digits teacher.
DEFAULT_TEACHERS: tuple[TeacherSource, ...] = (
    TeacherSource(
        name="digits-cnn",
        kind=TeacherSourceKind.builtin,
        location="digits-cnn",
        type="cnn",
        params=digits_cnn_parameters(),  # 789,310 for the digits' 8x8 images and 10 classes
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
