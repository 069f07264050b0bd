"""Distillation losses in a registry keyed by name, combined as a weighted sum of named terms.

Every term takes a `LossInputs` and returns a scalar. Logits may be (B, C) or (B, T, V): token tasks are
flattened, and positions whose target is IGNORE_INDEX (-100) do not count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.distill.contract import EngineError
from workers.distill.kernel import IGNORE_INDEX, ModelOutputs


@dataclass
class LossInputs:
    """What a loss term may read."""

    student: ModelOutputs
    teacher: ModelOutputs | None  # None when only label terms are used (baseline)
    targets: torch.Tensor  # (B,) | (B, T); IGNORE_INDEX = ignore
    temperature: float
    projector: FeatureProjector | None = None
    attention_mask: torch.Tensor | None = None  # (B, T) 1 = real token, for (B, T, H) features/attentions
    # Per-job options of task terms (TaskAdapter.loss_options), e.g. the language-model divergence.
    options: dict[str, Any] = field(default_factory=dict)
    # training_config.layer_mapping: teacher hidden state per student hidden state (None: uniform).
    layer_mapping: Sequence[int] | None = None


LossFn = Callable[[LossInputs], torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    """A registered loss term and what it needs from the forward passes."""

    name: str
    fn: LossFn
    needs_teacher: bool = True
    needs_hidden_states: bool = False
    needs_attentions: bool = False


LOSSES: dict[str, LossTerm] = {}


def register_loss(
    name: str,
    *,
    needs_teacher: bool = True,
    needs_hidden_states: bool = False,
    needs_attentions: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator: register a loss term under `name`; a name registered twice is an error."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered")
        LOSSES[name] = LossTerm(name, fn, needs_teacher, needs_hidden_states, needs_attentions)
        return fn

    return decorator


def get_loss(name: str) -> LossTerm:
    """The term registered as `name`; KeyError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss '{name}'; valid losses: {', '.join(sorted(LOSSES))}") from None


def soft_target_kl_value(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher_T || student_T) x T^2 (Hinton et al.), averaged over rows / valid token positions.

    (B, C) logits: every row counts (classification labels are never ignored). (B, T, V) logits: positions
    whose target is IGNORE_INDEX are zeroed with a mask, not dropped by boolean indexing (which would force a
    host-device sync every step).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, [T,] V)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, [T,] V)
    if student_logits.dim() == 2:
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * temperature**2
    per_position = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)
    valid = targets != IGNORE_INDEX  # (B, T)
    per_position = torch.where(valid, per_position, per_position.new_zeros(()))  # (B, T)
    return per_position.sum() / valid.sum().clamp_min(1) * temperature**2


@register_loss("soft_target_kl")
def soft_target_kl(inputs: LossInputs) -> torch.Tensor:
    """Response KD: the student matches the teacher's temperature-softened distribution."""
    assert inputs.teacher is not None
    return soft_target_kl_value(
        inputs.student.logits, inputs.teacher.logits, inputs.targets, inputs.temperature
    )


@register_loss("hard_target_ce", needs_teacher=False)
def hard_target_ce(inputs: LossInputs) -> torch.Tensor:
    """Cross-entropy with the true labels (ignored positions excluded)."""
    logits = inputs.student.logits
    if logits.dim() == 2:  # (B, C)
        return F.cross_entropy(logits.float(), inputs.targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(  # (B, T, V) -> (B*T, V)
        logits.reshape(-1, logits.shape[-1]).float(), inputs.targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def checked_mapping(
    mapping: Sequence[int] | None, student_layers: int, teacher_layers: int, *, what: str
) -> list[int]:
    """`mapping` (one teacher index per student layer) checked against the layer counts; None: uniform."""
    if mapping is None:
        return layer_mapping(student_layers, teacher_layers)
    if len(mapping) != student_layers or max(mapping) >= teacher_layers:
        raise EngineError(
            "student_incompatible",
            f"training_config.layer_mapping {list(mapping)} does not fit the {what}: it needs one entry per "
            f"student layer ({student_layers}), each a teacher layer index below {teacher_layers}",
        )
    return list(mapping)


def attention_mapping(mapping: Sequence[int] | None, student_maps: int, teacher_maps: int) -> list[int]:
    """Teacher attention block per student block. A mapping given over hidden states (embeddings = 0, one
    more entry than blocks) maps block i to the teacher block whose output is hidden state mapping[i + 1]."""
    if mapping is not None and len(mapping) == student_maps + 1:
        mapping = [max(0, j - 1) for j in mapping[1:]]
    return checked_mapping(mapping, student_maps, teacher_maps, what="attention maps")


def layer_mapping(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer: i <- round((i + 1) * L_t / L_s) - 1; last maps to last."""
    return [
        min(teacher_layers - 1, max(0, math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1))
        for i in range(student_layers)
    ]


class FeatureProjector(nn.Module):
    """Learned linear maps from student hidden widths to the mapped teacher layers' widths.

    Built from one probe forward pass; owned by the loop, trained by its optimizer, saved in checkpoints.
    """

    def __init__(
        self,
        student_widths: Sequence[int],
        teacher_widths: Sequence[int],
        mapping: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.mapping = checked_mapping(
            mapping, len(student_widths), len(teacher_widths), what="hidden states"
        )
        self.student_widths = list(student_widths)
        self.teacher_widths = [teacher_widths[j] for j in self.mapping]
        self.maps = nn.ModuleList(
            nn.Identity() if s == t else nn.Linear(s, t, bias=False)
            for s, t in zip(self.student_widths, self.teacher_widths, strict=True)
        )

    def forward(self, student_hidden: torch.Tensor, index: int) -> torch.Tensor:
        return self.maps[index](student_hidden)  # (..., H_student) -> (..., H_teacher)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B,) | (B, T) values over positions where mask (B, T) is set."""
    if mask is None or values.dim() == 1:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


@register_loss("feature_kd", needs_hidden_states=True)
def feature_kd(inputs: LossInputs) -> torch.Tensor:
    """Hidden-state KD: squared distance of L2-normalised (projected) student and teacher states.

    Per position this is 2 - 2 cos(angle); averaged over mapped layers and valid positions.
    """
    assert inputs.teacher is not None
    student_states = inputs.student.hidden_states
    teacher_states = inputs.teacher.hidden_states
    if not student_states or not teacher_states or inputs.projector is None:
        raise ValueError("feature_kd needs hidden states from both models and a FeatureProjector")
    projector = inputs.projector
    losses = []
    for i, j in enumerate(projector.mapping):
        student = F.normalize(projector(student_states[i].float(), i), dim=-1)  # (B, [T,] H_t)
        teacher = F.normalize(teacher_states[j].float(), dim=-1)  # (B, [T,] H_t)
        per_position = (student - teacher).pow(2).sum(dim=-1)  # (B,) | (B, T)
        losses.append(_masked_mean(per_position, inputs.attention_mask))
    return torch.stack(losses).mean()


@register_loss("attention_kd", needs_attentions=True)
def attention_kd(inputs: LossInputs) -> torch.Tensor:
    """Attention KD: MSE between head-averaged attention maps of mapped layers (heads may differ)."""
    assert inputs.teacher is not None
    student_maps = inputs.student.attentions
    teacher_maps = inputs.teacher.attentions
    if not student_maps or not teacher_maps:
        raise ValueError("attention_kd needs attention maps from both models")
    mapping = attention_mapping(inputs.layer_mapping, len(student_maps), len(teacher_maps))
    losses = []
    for i, j in enumerate(mapping):
        student = student_maps[i].float().mean(dim=1)  # (B, T, T)
        teacher = teacher_maps[j].float().mean(dim=1)  # (B, T, T)
        per_query = (student - teacher).pow(2).mean(dim=-1)  # (B, T)
        losses.append(_masked_mean(per_query, inputs.attention_mask))
    return torch.stack(losses).mean()


def combine_losses(
    weights: dict[str, float], inputs: LossInputs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the named terms (zero weights skipped); returns (total, raw term values)."""
    terms: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for name, weight in weights.items():
        if weight == 0:
            continue
        value = get_loss(name).fn(inputs)
        terms[name] = value
        total = value * weight if total is None else total + value * weight
    if total is None:
        raise ValueError(f"every loss weight is zero: {weights}")
    return total, terms


def needs(weights: dict[str, float]) -> tuple[bool, bool, bool]:
    """(teacher, hidden_states, attentions) needed by the non-zero terms of `weights`."""
    active = [get_loss(name) for name, weight in weights.items() if weight != 0]
    return (
        any(t.needs_teacher for t in active),
        any(t.needs_hidden_states for t in active),
        any(t.needs_attentions for t in active),
    )
