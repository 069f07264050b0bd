"""Token-level KD divergences for language models, on the full vocabulary or on a cached top-k of the teacher.

Five divergences (`training_config.lm_loss`), each per token at temperature T, times T², averaged over the
non-ignored tokens:

- `forward_kl`  KL(p || q), p the teacher, q the student (Hinton; mode-covering).
- `reverse_kl`  KL(q || p) (MiniLLM; mode-seeking).
- `jsd`         generalised Jensen-Shannon of TRL's GKD with β: β KL(p || m) + (1-β) KL(q || m),
                m = β p + (1-β) q; β = 0 is forward KL and β = 1 reverse KL exactly (the mixture form
                vanishes at the ends, so the ends are the KLs, as in TRL).
- `skew_kl`     DistiLLM's skew KL with s: KL(p || s p + (1-s) q); s = 0 is forward KL.
- `tvd`         total variation ½ Σ |p - q| (DistillKit).

A top-k teacher (values, ids) each (B, T, k) is compared on the support of its k ids:
- without a tail bucket the teacher's k probabilities are renormalised. Forward KL reads the student's
  full-vocabulary log-probabilities at those ids (the cross-entropy to the renormalised teacher: its gradient
  equals the full-vocabulary one when the k ids hold the teacher's mass); the other divergences need one
  support for both sides, so the student is renormalised over the same k ids too.
- with a tail bucket (`topk_tail`) both distributions get a (k+1)-th bin holding the mass outside the k ids:
  the student's exactly, the teacher's from its full-vocabulary log-normaliser at T cached beside the top-k
  (`topk_lse`, (B, T)). No renormalisation: the k+1 bins are proper distributions on both sides.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch
import torch.nn.functional as F

from workers.distill.kernel import IGNORE_INDEX

# A tail bin that is (numerically) empty gets this log-mass instead of -inf: exp(-100) is 0 in float32.
_EMPTY_LOG_MASS = -100.0


class Divergence(StrEnum):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_kl = "skew_kl"
    tvd = "tvd"


def topk_teacher_logits(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per token and their vocabulary ids: (B, T, k) values, (B, T, k) int64 ids."""
    k = min(k, teacher_logits.shape[-1])
    values, indices = teacher_logits.topk(k, dim=-1)
    return values, indices


def log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, stable at both ends (Mächler 2012); empty mass -> -100."""
    log_x = log_x.clamp_max(0.0)
    small = log_x > -math.log(2.0)
    value = torch.where(
        small,
        torch.log(-torch.expm1(log_x.clamp_max(-1e-30))),
        torch.log1p(-torch.exp(log_x.clamp_max(-math.log(2.0)))),
    )
    return value.clamp_min(_EMPTY_LOG_MASS)


def _with_tail(log_probs: torch.Tensor) -> torch.Tensor:
    """(N, k) log-probabilities of k bins -> (N, k+1) with the remaining mass as the last bin."""
    tail = log1mexp(torch.logsumexp(log_probs, dim=-1, keepdim=True))  # (N, 1)
    return torch.cat([log_probs, tail], dim=-1)


def _plogp_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ a (log a - log b) over the last dim, with 0 log 0 = 0: (N, S) -> (N,)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(dim=-1)


def divergence_per_token(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: Divergence, *, beta: float, skew: float
) -> torch.Tensor:
    """The divergence of teacher p and student q per row: log_p, log_q (N, S) -> (N,)."""
    if divergence == Divergence.forward_kl or (divergence == Divergence.jsd and beta == 0.0):
        return _plogp_ratio(log_p, log_q)
    if divergence == Divergence.reverse_kl or (divergence == Divergence.jsd and beta == 1.0):
        return _plogp_ratio(log_q, log_p)
    if divergence == Divergence.jsd:
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0
        )  # (N, S)
        return beta * _plogp_ratio(log_p, log_m) + (1.0 - beta) * _plogp_ratio(log_q, log_m)
    if divergence == Divergence.skew_kl:
        if skew == 0.0:
            return _plogp_ratio(log_p, log_q)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(skew), log_q + math.log(1.0 - skew)]), dim=0)
        return _plogp_ratio(log_p, log_m)
    if divergence == Divergence.tvd:
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    raise ValueError(f"unknown divergence '{divergence}'; valid: {', '.join(d.value for d in Divergence)}")


def token_divergence(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    divergence: Divergence | str = Divergence.forward_kl,
    beta: float = 0.5,
    skew: float = 0.1,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chosen divergence per token at temperature T, times T², averaged over non-ignored tokens.

    student_logits: (B, T, V); targets: (B, T) with IGNORE_INDEX at positions to skip. The teacher comes as
    full logits (B, T, V) or as top-k (values, ids) each (B, T, k); `teacher_lse` (B, T), the teacher's
    logsumexp(logits / T) over the full vocabulary, adds the tail bucket (module docstring).
    """
    divergence = Divergence(divergence)
    mask = targets != IGNORE_INDEX  # (B, T)
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    scaled_student = student_logits[mask].float() / temperature  # (N, V)
    student_log_probs = F.log_softmax(scaled_student, dim=-1)  # (N, V)
    if teacher_topk is not None:
        values, ids = teacher_topk
        ids_n = ids[mask].long()  # (N, k)
        scaled_teacher = values[mask].float() / temperature  # (N, k)
        if teacher_lse is not None:
            log_p = _with_tail(scaled_teacher - teacher_lse[mask].float().unsqueeze(-1))  # (N, k+1)
            log_q = _with_tail(student_log_probs.gather(-1, ids_n))  # (N, k+1)
        else:
            log_p = F.log_softmax(scaled_teacher, dim=-1)  # (N, k)
            if divergence == Divergence.forward_kl:
                log_q = student_log_probs.gather(-1, ids_n)  # (N, k), not renormalised
            else:
                log_q = F.log_softmax(scaled_student.gather(-1, ids_n), dim=-1)  # (N, k)
    elif teacher_logits is not None:
        log_p = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)  # (N, V)
        log_q = student_log_probs
    else:
        raise ValueError("token_divergence needs teacher_logits or teacher_topk")
    per_token = divergence_per_token(log_p, log_q, divergence, beta=beta, skew=skew)  # (N,)
    return per_token.mean() * temperature**2


def token_kl(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) per token at T, times T² (the default of `token_divergence`)."""
    return token_divergence(
        student_logits,
        targets,
        temperature=temperature,
        teacher_logits=teacher_logits,
        teacher_topk=teacher_topk,
    )


def hidden_cosine(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """DistilBERT's cosine loss: 1 - cos(student, teacher) of the last hidden states over real tokens.

    student_hidden, teacher_hidden: (B, T, H) of equal width; attention_mask: (B, T).
    """
    mask = attention_mask.bool()
    cosine = F.cosine_similarity(student_hidden[mask].float(), teacher_hidden[mask].float(), dim=-1)  # (N,)
    return (1.0 - cosine).mean()
