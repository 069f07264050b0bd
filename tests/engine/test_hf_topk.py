"""Top-k teacher cache for language models: the KD loss on the renormalised top-k tracks full-vocab KD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.schemas.job_spec import JobSpec
from workers.distill.kernel import IGNORE_INDEX, ModelOutputs
from workers.distill.losses import LOSSES, LossInputs, soft_target_kl_value
from workers.distill.registry import get_adapter
from workers.distill.tasks.transformers.losses import token_kl, topk_teacher_logits

torch.manual_seed(0)


def _peaked_teacher(batch: int, length: int, vocab: int, top: int) -> torch.Tensor:
    """(B, T, V) logits whose `top` largest entries hold nearly all the probability at T = 2."""
    logits = torch.randn(batch, length, vocab)
    favourite = torch.stack([torch.randperm(vocab)[:top] for _ in range(batch * length)]).view(
        batch, length, top
    )
    return logits.scatter_add(-1, favourite, torch.full(favourite.shape, 30.0))


def test_full_token_kl_equals_the_generic_soft_target_kl() -> None:
    student, teacher = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    targets = torch.randint(0, 40, (2, 5))
    targets[0, 3:] = IGNORE_INDEX
    expected = soft_target_kl_value(student, teacher, targets, 2.0)
    assert torch.allclose(
        token_kl(student, targets, temperature=2.0, teacher_logits=teacher), expected, atol=1e-6
    )


def test_topk_kd_within_tolerance_of_full_kd_when_k_covers_the_mass() -> None:
    student = torch.randn(3, 7, 500)
    teacher = _peaked_teacher(3, 7, 500, top=8)
    targets = torch.randint(0, 500, (3, 7))
    targets[1, 4:] = IGNORE_INDEX
    full = token_kl(student, targets, temperature=2.0, teacher_logits=teacher)
    mass = torch.softmax(teacher / 2.0, dim=-1).topk(16, dim=-1).values.sum(-1).min()
    assert mass > 0.999
    topk = token_kl(student, targets, temperature=2.0, teacher_topk=topk_teacher_logits(teacher, 16))
    assert torch.allclose(topk, full, rtol=1e-3)
    # When k misses most of the mass the approximation is visibly off (the test above can fail).
    flat = torch.randn(3, 7, 500) * 0.1
    full_flat = token_kl(student, targets, temperature=2.0, teacher_logits=flat)
    topk_flat = token_kl(student, targets, temperature=2.0, teacher_topk=topk_teacher_logits(flat, 4))
    assert abs(float(topk_flat - full_flat)) / float(full_flat) > 0.1


def test_topk_gradient_matches_full_gradient() -> None:
    teacher = _peaked_teacher(2, 4, 100, top=4)
    targets = torch.randint(0, 100, (2, 4))
    grads = []
    for kwargs in ({"teacher_logits": teacher}, {"teacher_topk": topk_teacher_logits(teacher, 12)}):
        student = torch.randn(2, 4, 100, generator=torch.Generator().manual_seed(1), requires_grad=True)
        token_kl(student, targets, temperature=2.0, **kwargs).backward()  # type: ignore[arg-type]
        grads.append(student.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_adapter_caches_topk_and_the_registered_term_reads_it(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": "causal-lm",
            "dataset_config": {"kind": "file", "path": "x.jsonl"},
            "training_config": {"teacher_cache_top_k": 12, "temperature": 2.0},
        }
    )
    adapter = get_adapter("causal-lm")
    teacher_logits = _peaked_teacher(2, 6, 80, top=3)
    mask = torch.ones(2, 6, dtype=torch.long)
    cached = adapter.cache_teacher_outputs(
        ModelOutputs(logits=teacher_logits, extra={"attention_mask": mask}), spec
    )
    assert cached.logits.shape == (2, 6, 12) and cached.extra["topk_ids"].shape == (2, 6, 12)
    assert adapter.cache_bytes_per_example(cached, 2) < teacher_logits[0].numel() * 4  # smaller than full
    weights = adapter.loss_weights(spec, temperature=2.0, alpha=0.7)
    assert weights == pytest.approx({"token_kl": 0.7, "hard_target_ce": 0.3})
    student = ModelOutputs(logits=torch.randn(2, 6, 80))
    targets = torch.randint(0, 80, (2, 6))
    term = LOSSES["token_kl"].fn
    full = term(
        LossInputs(
            student=student, teacher=ModelOutputs(logits=teacher_logits), targets=targets, temperature=2.0
        )
    )
    from_cache = term(LossInputs(student=student, teacher=cached, targets=targets, temperature=2.0))
    assert torch.allclose(from_cache, full, rtol=1e-3)
