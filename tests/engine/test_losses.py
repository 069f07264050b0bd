"""Loss terms against values computed by hand, the registry's errors, layer mapping, projector gradients."""

from __future__ import annotations

import math

import pytest
import torch

from workers.distill.kernel import IGNORE_INDEX, ModelOutputs
from workers.distill.losses import (
    LOSSES,
    FeatureProjector,
    LossInputs,
    combine_losses,
    get_loss,
    layer_mapping,
    register_loss,
)


def _inputs(
    student: ModelOutputs, teacher: ModelOutputs | None, targets: torch.Tensor, **kw: object
) -> LossInputs:
    return LossInputs(student=student, teacher=teacher, targets=targets, temperature=kw.pop("T", 1.0), **kw)  # type: ignore[arg-type]


def test_soft_target_kl_matches_hand_computation() -> None:
    # Teacher logits [ln 3, 0] at T=2 -> [sqrt3, 1]/(sqrt3 + 1); student logits [0, 0] -> [1/2, 1/2].
    student = ModelOutputs(logits=torch.tensor([[0.0, 0.0]]))
    teacher = ModelOutputs(logits=torch.tensor([[math.log(3.0), 0.0]]))
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    expected = sum(pi * math.log(pi / 0.5) for pi in p) * 2.0**2  # KL x T^2
    value = get_loss("soft_target_kl").fn(_inputs(student, teacher, torch.tensor([0]), T=2.0))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_hard_target_ce_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (math.e + 1))) / 2
    value = get_loss("hard_target_ce").fn(_inputs(ModelOutputs(logits), None, torch.tensor([0, 1])))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_response_kd_mixes_kl_and_ce_by_alpha() -> None:
    student = ModelOutputs(logits=torch.tensor([[0.0, 0.0]]))
    teacher = ModelOutputs(logits=torch.tensor([[math.log(3.0), 0.0]]))
    inputs = _inputs(student, teacher, torch.tensor([1]), T=1.0)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = math.log(2.0)
    total, terms = combine_losses({"soft_target_kl": 0.7, "hard_target_ce": 0.3}, inputs)
    assert terms["soft_target_kl"].item() == pytest.approx(kl, rel=1e-6)
    assert terms["hard_target_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert total.item() == pytest.approx(0.7 * kl + 0.3 * ce, rel=1e-6)


def test_token_level_kd_ignores_masked_positions() -> None:
    # (B=1, T=2, V=2): the second position is ignored, so only the first counts.
    student = ModelOutputs(logits=torch.tensor([[[0.0, 0.0], [50.0, -50.0]]]))
    teacher = ModelOutputs(logits=torch.tensor([[[math.log(3.0), 0.0], [-50.0, 50.0]]]))
    targets = torch.tensor([[0, IGNORE_INDEX]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    inputs = _inputs(student, teacher, targets)
    assert get_loss("soft_target_kl").fn(inputs).item() == pytest.approx(kl, rel=1e-6)
    assert get_loss("hard_target_ce").fn(inputs).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_feature_kd_on_normalised_states() -> None:
    # Orthogonal unit directions: |a/|a| - b/|b||^2 = 2; identical directions: 0. Mean over the batch = 1.
    student = ModelOutputs(logits=torch.zeros(2, 2), hidden_states=[torch.tensor([[3.0, 0.0], [0.0, 2.0]])])
    teacher = ModelOutputs(logits=torch.zeros(2, 2), hidden_states=[torch.tensor([[0.0, 5.0], [0.0, 7.0]])])
    projector = FeatureProjector([2], [2])  # same width: identity
    value = get_loss("feature_kd").fn(_inputs(student, teacher, torch.tensor([0, 0]), projector=projector))
    assert value.item() == pytest.approx(1.0, rel=1e-6)


def test_feature_kd_gradients_reach_the_projection() -> None:
    torch.manual_seed(0)
    projector = FeatureProjector([3, 3], [5, 5, 5, 5])
    assert projector.mapping == [1, 3]
    student_hidden = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    student = ModelOutputs(logits=torch.zeros(4, 2), hidden_states=student_hidden)
    teacher = ModelOutputs(logits=torch.zeros(4, 2), hidden_states=[torch.randn(4, 5) for _ in range(4)])
    value = get_loss("feature_kd").fn(
        _inputs(student, teacher, torch.zeros(4, dtype=torch.long), projector=projector)
    )
    value.backward()
    for linear in projector.maps:
        assert isinstance(linear, torch.nn.Linear)
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert student_hidden[0].grad is not None


def test_attention_kd_on_head_averaged_maps() -> None:
    # Student: 2 heads averaging to all-0.5 maps; teacher: one head, identity (B=1, T=2). MSE = 0.25.
    student_attn = torch.stack(
        [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    )
    student = ModelOutputs(logits=torch.zeros(1, 2, 3), attentions=[student_attn.unsqueeze(0)])
    teacher = ModelOutputs(logits=torch.zeros(1, 2, 3), attentions=[torch.eye(2).view(1, 1, 2, 2)] * 2)
    value = get_loss("attention_kd").fn(_inputs(student, teacher, torch.zeros(1, 2, dtype=torch.long)))
    assert value.item() == pytest.approx(0.25, rel=1e-6)


def test_layer_mapping_is_uniform_and_ends_on_the_last_layer() -> None:
    assert layer_mapping(2, 4) == [1, 3]
    assert layer_mapping(3, 12) == [3, 7, 11]
    assert layer_mapping(4, 4) == [0, 1, 2, 3]
    assert layer_mapping(1, 3) == [2]


def test_registry_rejects_duplicates_and_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_loss("soft_target_kl")(lambda inputs: inputs.student.logits.sum())
    with pytest.raises(KeyError, match=r"valid losses: .*hard_target_ce.*soft_target_kl"):
        get_loss("no_such_loss")
    assert {"soft_target_kl", "hard_target_ce", "feature_kd", "attention_kd"} <= set(LOSSES)


def test_zero_weights_are_skipped_and_all_zero_is_an_error() -> None:
    inputs = _inputs(ModelOutputs(torch.zeros(1, 2)), None, torch.tensor([0]))
    total, terms = combine_losses({"hard_target_ce": 1.0, "soft_target_kl": 0.0}, inputs)
    assert set(terms) == {"hard_target_ce"}
    assert total.item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="every loss weight is zero"):
        combine_losses({"hard_target_ce": 0.0}, inputs)
