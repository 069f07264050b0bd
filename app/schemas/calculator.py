"""The seed's distillation calculator: inputs and the figures it derives. Accuracies are fractions 0-1."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CalculatorInput(BaseModel):
    """Teacher and student sizes and accuracies (fractions, 0-1); measured latencies when known."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "teacher_params": 340_000_000,
                    "student_params": 13_600_000,
                    "teacher_accuracy": 0.92,
                    "student_accuracy": 0.891,
                }
            ]
        },
    )

    teacher_params: int = Field(strict=True, gt=0, le=10**13)
    student_params: int = Field(strict=True, gt=0, le=10**13)
    teacher_accuracy: float = Field(strict=True, ge=1e-3, le=1, description="Fraction 0.001-1 (0.92 for 92%)")
    student_accuracy: float = Field(strict=True, ge=0, le=1, description="Fraction 0-1 (0.891 for 89.1%)")
    # Bounded so every derived ratio stays finite (a 5e-324 latency would make the speed-up infinite).
    teacher_latency_ms: float | None = Field(
        strict=True, default=None, ge=1e-6, le=1e9, description="Measured, per forward pass"
    )
    student_latency_ms: float | None = Field(
        strict=True, default=None, ge=1e-6, le=1e9, description="Measured, per forward pass"
    )
    teacher_bytes_per_param: float = Field(
        strict=True, default=4.0, ge=0.125, le=16, description="4 for fp32, 2 bf16, 1 int8, 0.125 1-bit"
    )
    student_bytes_per_param: float = Field(
        strict=True, default=4.0, ge=0.125, le=16, description="4 for fp32, 2 bf16, 1 int8, 0.125 1-bit"
    )

    @model_validator(mode="after")
    def _latencies_together(self) -> CalculatorInput:
        if (self.teacher_latency_ms is None) != (self.student_latency_ms is None):
            raise ValueError("give both teacher_latency_ms and student_latency_ms, or neither")
        return self


class CalculatorResult(BaseModel):
    """Derived figures as fractions (and a ratio for speed), plus the seed's display strings."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "compression_ratio": 0.04,
                    "parameter_reduction": 0.96,
                    "accuracy_retention": 0.9684782608695652,
                    "accuracy_drop": 0.029,
                    "memory_reduction": 0.96,
                    "speed_improvement": 5.0,
                    "speed_improvement_estimated": True,
                    "cost_savings": 0.8,
                    "display": {
                        "compression_ratio": "4.00%",
                        "teacher_accuracy": "92.0%",
                        "student_accuracy": "89.1%",
                        "accuracy_retention": "96.8%",
                        "memory_reduction": "96.0%",
                        "speed_improvement": "5.0x (estimated)",
                        "cost_savings": "80.0%",
                    },
                }
            ]
        }
    )

    compression_ratio: float = Field(description="student params / teacher params")
    parameter_reduction: float = Field(description="1 - compression_ratio")
    accuracy_retention: float = Field(description="student accuracy / teacher accuracy")
    accuracy_drop: float = Field(description="teacher accuracy - student accuracy, in points of a fraction")
    memory_reduction: float = Field(description="1 - student bytes / teacher bytes")
    speed_improvement: float = Field(description="teacher latency / student latency, or the estimate")
    speed_improvement_estimated: bool = Field(
        description="True when no latencies were given: sqrt(teacher params / student params), as the seed",
    )
    cost_savings: float = Field(description="1 - 1 / speed_improvement")
    display: dict[str, str] = Field(description="The same figures formatted as the seed shows them")
