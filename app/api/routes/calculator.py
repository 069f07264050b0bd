"""The seed's distillation calculator."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CheckedQueryRoute, CurrentTenantDep
from app.schemas.calculator import CalculatorInput, CalculatorResult
from app.schemas.problem import problem_responses
from app.services import calculator as calculator_service

router = APIRouter(prefix="/distillation/calculator", tags=["calculator"], route_class=CheckedQueryRoute)


@router.post(
    "",
    response_model=CalculatorResult,
    summary="Compression, retention, memory, speed and cost figures from sizes and accuracies",
    description="Accuracies are fractions 0-1. Speed is the latency ratio when both latencies are given, "
    "else the seed's estimate sqrt(teacher params / student params), flagged `speed_improvement_estimated`. "
    "The seed's example (4%, 0.92 -> 0.891) gives retention 0.968, memory 0.96, speed 5.0, cost 0.80.",
    responses=problem_responses(401, 422),
)
def calculate(request: CalculatorInput, _tenant: CurrentTenantDep) -> CalculatorResult:
    return calculator_service.calculate(request)
