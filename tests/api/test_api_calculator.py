"""The seed's calculator: its example, measured latencies, and input bounds."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

SEED = {
    "teacher_params": 340_000_000,
    "student_params": 13_600_000,
    "teacher_accuracy": 0.92,
    "student_accuracy": 0.891,
}


def test_seed_example(client: TestClient) -> None:
    result = client.post("/distillation/calculator", json=SEED).json()
    assert result["compression_ratio"] == pytest.approx(0.04)
    assert round(result["accuracy_retention"] * 100, 1) == 96.8
    assert result["memory_reduction"] == pytest.approx(0.96)
    assert result["speed_improvement"] == pytest.approx(5.0)
    assert result["speed_improvement_estimated"] is True
    assert result["cost_savings"] == pytest.approx(0.80)
    assert result["display"] == {
        "compression_ratio": "4.00%",
        "teacher_accuracy": "92.0%",
        "student_accuracy": "89.1%",
        "accuracy_retention": "96.8%",
        "memory_reduction": "96.0%",
        "speed_improvement": "5.0x (estimated)",
        "cost_savings": "80.0%",
    }


def test_measured_latencies_and_bytes_per_parameter(client: TestClient) -> None:
    payload = SEED | {
        "teacher_latency_ms": 12.0,
        "student_latency_ms": 3.0,
        "teacher_bytes_per_param": 4,
        "student_bytes_per_param": 1,
    }
    result = client.post("/distillation/calculator", json=payload).json()
    assert result["speed_improvement"] == pytest.approx(4.0)
    assert result["speed_improvement_estimated"] is False
    assert result["cost_savings"] == pytest.approx(0.75)
    assert result["memory_reduction"] == pytest.approx(1 - 0.04 / 4)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"teacher_accuracy": 92.0}, "teacher_accuracy"),
        ({"student_accuracy": -0.1}, "student_accuracy"),
        ({"student_params": 0}, "student_params"),
        ({"teacher_latency_ms": 5.0}, "body"),  # only one latency: a whole-body error
    ],
)
def test_bad_input_is_422(client: TestClient, problem: Any, patch: dict[str, Any], field: str) -> None:
    body = problem(client.post("/distillation/calculator", json=SEED | patch), 422)
    assert body["errors"][0]["field"] == field
    if field == "body":
        assert "both teacher_latency_ms and student_latency_ms" in body["detail"]
