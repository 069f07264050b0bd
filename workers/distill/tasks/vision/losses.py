"""Feature-map loss terms for image models, registered in the shared loss registry.

The vision adapter hands feature maps to the losses channel-last, (B, h, w, C) (CNN stages permuted, ViT
patch tokens laid out on their grid), so the loop's `FeatureProjector` (a Linear on the last dimension)
is exactly FitNets' learned 1x1 convolution regressor, built and trained by the generic loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.distill.losses import LossInputs, layer_mapping, register_loss


def align_spatial(student: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W): average-pooled when larger, bilinearly upsampled when smaller."""
    if tuple(student.shape[-2:]) == size:
        return student
    if student.shape[-2] >= size[0] and student.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(student, size)
    return F.interpolate(student, size=size, mode="bilinear", align_corners=False)


def hint_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """FitNets hint: MSE between the regressed student map and the teacher map, both (B, C_t, H, W)."""
    aligned = align_spatial(student_map, (teacher_map.shape[-2], teacher_map.shape[-1]))
    return (aligned - teacher_map).pow(2).mean()


def spatial_attention(feature_map: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' activation-based attention: mean_c F^2, flattened and L2-normalised.

    (B, C, H, W) -> (B, H*W).
    """
    return F.normalize(feature_map.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """|| Q_s/||Q_s|| - Q_t/||Q_t|| ||_2 per image (the paper's p = 2), averaged; maps (B, C, H, W)."""
    size = (teacher_map.shape[-2], teacher_map.shape[-1])
    student_att = spatial_attention(align_spatial(student_map, size))  # (B, H*W)
    teacher_att = spatial_attention(teacher_map)  # (B, H*W)
    return (student_att - teacher_att).norm(p=2, dim=1).mean()


def _channel_first(grid: torch.Tensor) -> torch.Tensor:
    return grid.permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)


@register_loss("feature_map_hint", needs_hidden_states=True)
def feature_map_hint(inputs: LossInputs) -> torch.Tensor:
    """FitNets on every mapped pair of feature maps: learned 1x1 regressor, spatial sizes aligned."""
    assert inputs.teacher is not None
    student_maps = inputs.student.hidden_states
    teacher_maps = inputs.teacher.hidden_states
    if not student_maps or not teacher_maps or inputs.projector is None:
        raise ValueError("feature_map_hint needs feature maps from both models and a FeatureProjector")
    projector = inputs.projector
    losses = []
    for i, j in enumerate(projector.mapping):
        regressed = projector(student_maps[i].float(), i)  # (B, h, w, C_s) -> (B, h, w, C_t)
        losses.append(hint_loss(_channel_first(regressed), _channel_first(teacher_maps[j].float())))
    return torch.stack(losses).mean()


@register_loss("attention_transfer", needs_hidden_states=True)
def attention_transfer(inputs: LossInputs) -> torch.Tensor:
    """Attention transfer on mapped pairs of feature maps (channel counts may differ: maps are per pixel)."""
    assert inputs.teacher is not None
    student_maps = inputs.student.hidden_states
    teacher_maps = inputs.teacher.hidden_states
    if not student_maps or not teacher_maps:
        raise ValueError("attention_transfer needs feature maps from both models")
    mapping = inputs.projector.mapping if inputs.projector is not None else None
    mapping = mapping or layer_mapping(len(student_maps), len(teacher_maps))
    losses = [
        attention_transfer_loss(
            _channel_first(student_maps[i].float()), _channel_first(teacher_maps[j].float())
        )
        for i, j in enumerate(mapping)
    ]
    return torch.stack(losses).mean()
