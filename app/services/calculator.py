"""The seed's distillation calculator, as a pure function."""

from __future__ import annotations

import math

from app.schemas.calculator import CalculatorInput, CalculatorResult


def calculate(request: CalculatorInput) -> CalculatorResult:
    """Compression, retention, memory, speed (measured or the seed's sqrt estimate) and cost figures."""
    ratio = request.student_params / request.teacher_params
    retention = request.student_accuracy / request.teacher_accuracy
    teacher_bytes = request.teacher_params * request.teacher_bytes_per_param
    student_bytes = request.student_params * request.student_bytes_per_param
    memory_reduction = 1.0 - student_bytes / teacher_bytes
    if request.teacher_latency_ms is not None and request.student_latency_ms is not None:
        speed = request.teacher_latency_ms / request.student_latency_ms
        estimated = False
    else:
        speed = math.sqrt(request.teacher_params / request.student_params)
        estimated = True
    cost_savings = 1.0 - 1.0 / speed
    display = {
        "compression_ratio": f"{ratio * 100:.2f}%",
        "teacher_accuracy": f"{request.teacher_accuracy * 100:.1f}%",
        "student_accuracy": f"{request.student_accuracy * 100:.1f}%",
        "accuracy_retention": f"{retention * 100:.1f}%",
        "memory_reduction": f"{memory_reduction * 100:.1f}%",
        "speed_improvement": f"{speed:.1f}x" + (" (estimated)" if estimated else ""),
        "cost_savings": f"{cost_savings * 100:.1f}%",
    }
    return CalculatorResult(
        compression_ratio=ratio,
        parameter_reduction=1.0 - ratio,
        accuracy_retention=retention,
        accuracy_drop=request.teacher_accuracy - request.student_accuracy,
        memory_reduction=memory_reduction,
        speed_improvement=speed,
        speed_improvement_estimated=estimated,
        cost_savings=cost_savings,
        display=display,
    )
