"""LM divergences (training_config.lm_loss) against values computed by hand: full vocabulary and top-k."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.kernel import IGNORE_INDEX, ModelOutputs
from workers.distill.losses import LOSSES, LossInputs
from workers.distill.registry import get_adapter
from workers.distill.tasks.transformers.losses import log1mexp, token_divergence, topk_teacher_logits

# Teacher logits [ln 3, 0] at T=1 (or [ln 9, 0] at T=2) -> p = [3/4, 1/4]; student [0, 0] -> q = [1/2, 1/2].
P = (0.75, 0.25)
Q = (0.5, 0.5)


def _kl(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _mix(weight: float, a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(weight * x + (1 - weight) * y for x, y in zip(a, b, strict=True))


HAND = {
    "forward_kl": _kl(P, Q),
    "reverse_kl": _kl(Q, P),
    "jsd": 0.5 * _kl(P, _mix(0.5, P, Q)) + 0.5 * _kl(Q, _mix(0.5, P, Q)),
    "skew_kl": _kl(P, _mix(0.1, P, Q)),
    "tvd": 0.5 * (abs(0.75 - 0.5) + abs(0.25 - 0.5)),
}


def _pair(temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B=1, T=2, V=2) student/teacher logits; the second position is ignored (and wildly different)."""
    teacher_first = math.log(3.0) * temperature
    student = torch.tensor([[[0.0, 0.0], [40.0, -40.0]]])
    teacher = torch.tensor([[[teacher_first, 0.0], [-40.0, 40.0]]])
    targets = torch.tensor([[0, IGNORE_INDEX]])
    return student, teacher, targets


@pytest.mark.parametrize("divergence", sorted(HAND))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_divergences_match_hand_values(divergence: str, temperature: float) -> None:
    student, teacher, targets = _pair(temperature)
    value = token_divergence(
        student, targets, temperature=temperature, divergence=divergence, beta=0.5, skew=0.1,
        teacher_logits=teacher,
    )  # fmt: skip
    assert value.item() == pytest.approx(HAND[divergence] * temperature**2, rel=1e-5)


def test_jsd_beta_ends_are_the_two_kls_and_skew_zero_is_forward_kl() -> None:
    student, teacher, targets = _pair(1.0)
    common = {"temperature": 1.0, "teacher_logits": teacher}
    jsd0 = token_divergence(student, targets, divergence="jsd", beta=0.0, **common)  # type: ignore[arg-type]
    jsd1 = token_divergence(student, targets, divergence="jsd", beta=1.0, **common)  # type: ignore[arg-type]
    skew0 = token_divergence(student, targets, divergence="skew_kl", skew=0.0, **common)  # type: ignore[arg-type]
    assert jsd0.item() == pytest.approx(HAND["forward_kl"], rel=1e-6)
    assert jsd1.item() == pytest.approx(HAND["reverse_kl"], rel=1e-6)
    assert skew0.item() == pytest.approx(HAND["forward_kl"], rel=1e-6)
    # beta = 0.9 by hand: m = 0.9 p + 0.1 q.
    m = _mix(0.9, P, Q)
    jsd9 = token_divergence(student, targets, divergence="jsd", beta=0.9, **common)  # type: ignore[arg-type]
    assert jsd9.item() == pytest.approx(0.9 * _kl(P, m) + 0.1 * _kl(Q, m), rel=1e-5)


# Top-k: V = 4, k = 2. Teacher probabilities [0.5, 0.3, 0.15, 0.05] (top-2 ids 0, 1; tail 0.2);
# student [0.25, 0.25, 0.25, 0.25] (at ids 0, 1: 0.25 each; tail 0.5).
PT = (0.5, 0.3, 0.15, 0.05)
QS = (0.25, 0.25, 0.25, 0.25)


def _topk_case() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    teacher_logits = torch.log(torch.tensor([[PT]]))  # (1, 1, 4)
    student = torch.zeros(1, 1, 4)
    targets = torch.tensor([[1]])
    topk = topk_teacher_logits(teacher_logits, 2)
    lse = torch.logsumexp(teacher_logits, dim=-1)  # (1, 1): 0 here (probabilities sum to 1)
    return student, topk, targets, lse


def test_topk_with_tail_bucket_matches_hand_values() -> None:
    student, topk, targets, lse = _topk_case()
    p = (0.5, 0.3, 0.2)  # top-2 + tail
    q = (0.25, 0.25, 0.5)
    for divergence, expected in (
        ("forward_kl", _kl(p, q)),
        ("reverse_kl", _kl(q, p)),
        ("tvd", 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))),
        ("skew_kl", _kl(p, _mix(0.1, p, q))),
        ("jsd", 0.5 * _kl(p, _mix(0.5, p, q)) + 0.5 * _kl(q, _mix(0.5, p, q))),
    ):
        value = token_divergence(
            student, targets, temperature=1.0, divergence=divergence, teacher_topk=topk, teacher_lse=lse
        )
        assert value.item() == pytest.approx(expected, rel=1e-5), divergence


def test_topk_renormalised_without_tail_matches_hand_values() -> None:
    student, topk, targets, _ = _topk_case()
    p = (0.5 / 0.8, 0.3 / 0.8)  # the teacher's top-2, renormalised
    # Forward KL reads the student's full-vocabulary probabilities at the ids (today's behaviour) ...
    forward = token_divergence(student, targets, temperature=1.0, teacher_topk=topk)
    assert forward.item() == pytest.approx(sum(a * math.log(a / 0.25) for a in p), rel=1e-5)
    # ... the others renormalise the student over the same ids (0.5, 0.5).
    reverse = token_divergence(student, targets, temperature=1.0, divergence="reverse_kl", teacher_topk=topk)
    assert reverse.item() == pytest.approx(_kl((0.5, 0.5), p), rel=1e-5)
    tvd = token_divergence(student, targets, temperature=1.0, divergence="tvd", teacher_topk=topk)
    assert tvd.item() == pytest.approx(0.5 * (abs(p[0] - 0.5) + abs(p[1] - 0.5)), rel=1e-5)


def test_topk_with_tail_at_temperature_uses_the_cached_normaliser() -> None:
    """At T = 2 the tail bin needs logsumexp(logits / 2) over the full vocabulary: by hand from sqrt(p)."""
    student, topk, targets, _ = _topk_case()
    teacher_logits = torch.log(torch.tensor([[PT]]))
    lse2 = torch.logsumexp(teacher_logits / 2.0, dim=-1)
    roots = [math.sqrt(x) for x in PT]
    p2 = [r / sum(roots) for r in roots]
    p = (p2[0], p2[1], p2[2] + p2[3])
    q = (0.25, 0.25, 0.5)
    value = token_divergence(student, targets, temperature=2.0, teacher_topk=topk, teacher_lse=lse2)
    assert value.item() == pytest.approx(_kl(p, q) * 4.0, rel=1e-5)


def test_tail_equals_full_when_k_is_the_whole_vocabulary() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    targets = torch.zeros(2, 3, dtype=torch.long)
    for divergence in HAND:
        full = token_divergence(
            student, targets, temperature=2.0, divergence=divergence, teacher_logits=teacher
        )
        topk = token_divergence(
            student, targets, temperature=2.0, divergence=divergence,
            teacher_topk=topk_teacher_logits(teacher, 10), teacher_lse=torch.logsumexp(teacher / 2.0, dim=-1),
        )  # fmt: skip
        assert topk.item() == pytest.approx(full.item(), rel=1e-4, abs=1e-6), divergence


def test_log1mexp_is_stable_at_both_ends() -> None:
    values = log1mexp(torch.tensor([0.0, -1e-12, -0.5, -50.0]))
    assert -101.0 < values[0].item() < -60.0  # empty tail: finite, not -inf
    assert values[2].item() == pytest.approx(math.log(1 - math.exp(-0.5)), rel=1e-6)
    assert values[3].item() == pytest.approx(-math.exp(-50.0), rel=1e-6)
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("task", ["causal-lm", "masked-lm"])
def test_registered_term_reads_the_jobs_divergence(task: str) -> None:
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": task,
            "dataset_config": {"kind": "file", "path": "x.jsonl"},
            "training_config": {"lm_loss": "reverse_kl", "temperature": 1.0},
        }
    )
    options = get_adapter(task).loss_options(spec)
    assert options["divergence"] == "reverse_kl"
    student, teacher, targets = _pair(1.0)
    value = LOSSES["token_kl"].fn(
        LossInputs(
            student=ModelOutputs(student),
            teacher=ModelOutputs(teacher),
            targets=targets,
            temperature=1.0,
            options=options,
        )
    )
    assert value.item() == pytest.approx(HAND["reverse_kl"], rel=1e-5)


def test_spec_refuses_lm_options_for_other_tasks() -> None:
    base = {"teacher_model_name": "t", "dataset_config": {"kind": "file", "path": "x.jsonl"}}
    with pytest.raises(ValueError, match="lm_loss"):
        JobSpec.model_validate(
            {**base, "task": "sequence-classification", "training_config": {"lm_loss": "jsd"}}
        )
    with pytest.raises(ValueError, match="on_policy_fraction"):
        JobSpec.model_validate({**base, "task": "masked-lm", "training_config": {"on_policy_fraction": 0.5}})
    with pytest.raises(ValueError, match="choose one"):
        JobSpec.model_validate(
            {**base, "task": "causal-lm", "training_config": {"sequence_kd": True, "on_policy_fraction": 0.5}}
        )


def test_padded_vocabulary_of_the_same_tokenizer_is_sliced(tmp_path: Path) -> None:
    """A teacher whose embedding rows are rounded up compares with an unpadded student on the real ids."""
    from tests.engine.tiny_models import save_tiny_gpt2
    from workers.distill.contract import NullCallbacks

    model = save_tiny_gpt2(tmp_path / "padded", layers=1, hidden=16, heads=2)
    real = model.config.vocab_size
    model.resize_token_embeddings(real + 13)  # e.g. rounded up to a multiple of 64
    model.save_pretrained(tmp_path / "padded")
    (tmp_path / "lm.jsonl").write_text(
        "".join('{"text": "the day was very good and fine ."}\n' for _ in range(12))
    )
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": "causal-lm",
            "dataset_config": {"kind": "file", "path": "lm.jsonl"},
        }
    )
    adapter = get_adapter("causal-lm")
    data = adapter.load_data(spec, data_dir=tmp_path, file_root=tmp_path)
    teacher = adapter.load_teacher(
        TeacherSource(name="padded", kind=TeacherSourceKind.local, location="padded", type="transformer"),
        spec, data, data_dir=tmp_path, file_root=tmp_path, device=torch.device("cpu"),
        callbacks=NullCallbacks(), trust_remote_code=False,
    )  # fmt: skip
    assert teacher.get_output_embeddings().weight.shape[0] == real + 13  # type: ignore[operator,union-attr]
    batch = data.train.get_batch(torch.arange(2))  # type: ignore[attr-defined]
    logits = adapter.forward(teacher, batch).logits
    assert logits.shape[-1] == real
    with torch.no_grad():
        full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(logits, full[..., :real])
