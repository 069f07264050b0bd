"""Token-level KD losses for language models, on the full vocabulary or on a cached top-k of the teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.distill.kernel import IGNORE_INDEX


def topk_teacher_logits(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per token and their vocabulary ids: (B, T, k) values, (B, T, k) int64 ids."""
    k = min(k, teacher_logits.shape[-1])
    values, indices = teacher_logits.topk(k, dim=-1)
    return values, indices


def token_kl(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, times T², averaged over non-ignored tokens.

    student_logits: (B, T, V); targets: (B, T) with IGNORE_INDEX at positions to skip. The teacher comes as
    full logits (B, T, V) or as top-k (values, ids) each (B, T, k): then the teacher distribution is the
    softmax over its k values (renormalised) and the student's full-vocabulary log-probabilities are read at
    those ids, so the loss equals the full KL when the top-k hold the teacher's mass.
    """
    mask = targets != IGNORE_INDEX  # (B, T)
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    student_log_probs = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)  # (N, V)
    if teacher_topk is not None:
        values, ids = teacher_topk
        teacher_log_probs = F.log_softmax(values[mask].float() / temperature, dim=-1)  # (N, k)
        student_at_ids = student_log_probs.gather(-1, ids[mask].long())  # (N, k)
    elif teacher_logits is not None:
        teacher_log_probs = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)  # (N, V)
        student_at_ids = student_log_probs
    else:
        raise ValueError("token_kl needs teacher_logits or teacher_topk")
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_at_ids)).sum(dim=-1)  # (N,)
    return kl.mean() * temperature**2


def hidden_cosine(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """DistilBERT's cosine loss: 1 - cos(student, teacher) of the last hidden states over real tokens.

    student_hidden, teacher_hidden: (B, T, H) of equal width; attention_mask: (B, T).
    """
    mask = attention_mask.bool()
    cosine = F.cosine_similarity(student_hidden[mask].float(), teacher_hidden[mask].float(), dim=-1)  # (N,)
    return (1.0 - cosine).mean()
