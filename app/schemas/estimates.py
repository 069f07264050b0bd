"""The answer of POST /distillation/jobs/estimate (also stored on each job as `estimate`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobEstimate(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "task": "classification",
                    "device_type": "cpu",
                    "teacher_model_name": "digits-cnn",
                    "teacher_parameters": 846826,
                    "student_parameters": 211706,
                    "dataset_rows": 1797,
                    "train_rows": 1294,
                    "val_rows": 144,
                    "flops": 1.9e13,
                    "expected_training_seconds": 7.9,
                    "expected_training_seconds_range": [6.8, 9.4],
                    "flops_per_second": 2.4e12,
                    "history_jobs": 12,
                    "basis": "median training throughput of 12 finished jobs (same task, device type and "
                    "teacher size (within 3x)): 2.4e+12 FLOP/s",
                }
            ]
        },
    )

    task: str
    device_type: str = Field(description="cpu or cuda: asked for, or (auto) what the live workers have")
    teacher_model_name: str
    teacher_parameters: int | None
    student_parameters: int | None = Field(description="teacher_parameters x target_compression")
    dataset_rows: int | None = Field(description="Examples in the whole dataset")
    train_rows: int | None = Field(description="Examples in the train split (80 % less a 10 % validation)")
    val_rows: int | None
    flops: float | None = Field(description="Training FLOPs of every run of the job (baseline, stages)")
    expected_training_seconds: float | None = Field(
        description="flops / flops_per_second: the training phase only (teacher preparation, evaluation "
        "and export come on top)"
    )
    expected_training_seconds_range: list[float] | None = Field(
        description="From the quartiles (or extremes, with fewer than 4 jobs) of the measured throughputs"
    )
    flops_per_second: float | None
    history_jobs: int = Field(description="Finished jobs whose measured throughput the estimate uses")
    basis: str = Field(description="How the figure was made, or why there is none")
    runs: list[dict[str, Any]] | None = None
