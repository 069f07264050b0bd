"""Digits data exactly as specified; students sized from target_compression; model configs rebuild models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from workers.distill.contract import EngineError
from workers.distill.kernel import count_parameters
from workers.distill.registry import get_adapter, register_adapter, registered_tasks
from workers.distill.tasks.classification.data import load_digits_data
from workers.distill.tasks.classification.models import MLP, DigitsCNN, SmallCNN, build_model, model_config


def test_digits_splits_follow_the_issue() -> None:
    data = load_digits_data()
    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    test = data.test.tensors  # type: ignore[attr-defined]
    assert test["inputs"].dtype == torch.float32 and test["inputs"].shape == (360, 64)
    assert np.allclose(test["inputs"].numpy(), x_test / 16.0)
    assert np.array_equal(test["labels"].numpy(), y_test)
    assert len(data.train) + len(data.val) == 1797 - 360  # type: ignore[arg-type]
    assert len(data.val) == 144  # type: ignore[arg-type]
    assert float(data.train.tensors["inputs"].max()) <= 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("target", [0.003, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5])
def test_student_size_tracks_target_compression(target: float) -> None:
    adapter = get_adapter("classification")
    teacher = DigitsCNN()
    student = adapter.build_student(teacher, target, seed=0)
    ratio = count_parameters(student) / count_parameters(teacher)
    assert ratio <= target  # never above the budget ...
    assert ratio == pytest.approx(target, rel=0.1)  # ... and within 10% of it


def test_student_is_deterministic_in_seed_and_rebuilds_from_config() -> None:
    adapter = get_adapter("classification")
    teacher = DigitsCNN()
    a = adapter.build_student(teacher, 0.01, seed=3)
    b = adapter.build_student(teacher, 0.01, seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    rebuilt = build_model(model_config(a))
    assert isinstance(rebuilt, SmallCNN) and rebuilt.config == a.config  # type: ignore[union-attr]
    # An MLP teacher gets an MLP student.
    mlp_student = adapter.build_student(MLP(64, 10, [512]), 0.1, seed=0)
    assert isinstance(mlp_student, MLP)
    assert count_parameters(mlp_student) / count_parameters(MLP(64, 10, [512])) == pytest.approx(0.1, rel=0.1)


def test_adapter_registry_errors() -> None:
    assert "classification" in registered_tasks()
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("classification", lambda: get_adapter("classification"))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=r"valid tasks: .*classification") as info:
        get_adapter("speech")
    assert info.value.code == "unsupported"
