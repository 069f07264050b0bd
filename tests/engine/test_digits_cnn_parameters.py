"""The registry's torch-free parameter count of the built-in teacher matches the engine's model."""

from __future__ import annotations

from app.schemas.teachers import DEFAULT_TEACHERS, digits_cnn_parameters
from workers.distill.tasks.classification.models import DigitsCNN


def test_the_registry_count_is_the_models_own() -> None:
    model = DigitsCNN()
    assert digits_cnn_parameters() == sum(p.numel() for p in model.parameters()) == 789_310
    assert digits_cnn_parameters(channels=4, hidden=20) == sum(
        p.numel() for p in DigitsCNN(channels=4, hidden=20).parameters()
    )
    digits = next(t for t in DEFAULT_TEACHERS if t.name == "digits-cnn")
    assert digits.params == 789_310
