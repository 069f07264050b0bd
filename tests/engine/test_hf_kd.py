"""Transformer tasks end to end with tiny local models: teacher -> student -> KD -> save -> reload -> same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import classification_rows, lm_rows, save_tiny_bert, save_tiny_gpt2, write_jsonl
from workers.distill.compress import INT8_RECIPE, INT8_WEIGHTS, load_int8_student
from workers.distill.contract import JobPaths, NullCallbacks, Progress
from workers.distill.kernel import iterate_batches
from workers.distill.losses import FeatureProjector, LossInputs, combine_losses, needs
from workers.distill.registry import get_adapter
from workers.distill.runner import run_job
from workers.distill.tasks.transformers.onnx_export import run_onnx

torch.set_num_threads(2)


class RecordingCallbacks(NullCallbacks):
    """Keeps every event and progress report."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.progress: list[Progress] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((kind, message, data))

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    write_jsonl(root / "cls.jsonl", classification_rows(150, seed=1))
    write_jsonl(root / "lm.jsonl", lm_rows(120, seed=2))
    save_tiny_bert(root / "bert-base", head="none", layers=4, hidden=32, heads=4)
    save_tiny_bert(root / "bert-cls", head="sequence-classification", layers=4, hidden=32, heads=4)
    save_tiny_bert(root / "bert-mlm", head="masked-lm", layers=4, hidden=32, heads=4)
    save_tiny_gpt2(root / "gpt2", layers=4, hidden=32, heads=4)
    return root


def _source(root: Path, name: str) -> TeacherSource:
    return TeacherSource(name=name, kind=TeacherSourceKind.local, location=name, type="transformer")


def _spec(task: str, data: str, method: str = "response_distillation", **extra: Any) -> JobSpec:
    training = {
        "epochs": 2,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "temperature": 2.0,
        "max_seq_length": 32,
    }
    training.update(extra.pop("training", {}))
    return JobSpec.model_validate(
        {
            "teacher_model_name": "tiny",
            "task": task,
            "target_compression": 0.4,
            "distillation_method": method,
            "dataset_config": {"kind": "file", "path": data},
            "training_config": training,
            **extra,
        }
    )


def _falling(history: list[Any]) -> bool:
    return history[-1].total_loss < history[0].total_loss


def test_sequence_classification_finetunes_headless_teacher_then_distils(workspace: Path) -> None:
    spec = _spec(
        "sequence-classification",
        "cls.jsonl",
        "attention_distillation",
        training={"teacher_finetune_epochs": 2, "teacher_cache": "on"},
        compression={"prune_amount": 0.3, "quantize": "int8"},
    )
    callbacks = RecordingCallbacks()
    paths = JobPaths(workspace / "job-cls")
    results = run_job(
        spec,
        teacher=_source(workspace, "bert-base"),
        paths=paths,
        data_dir=workspace / "data",
        callbacks=callbacks,
        file_root=workspace,
    )
    # The headless teacher got its own fine-tuning phase first.
    phases = [p.phase for p in callbacks.progress]
    assert "teacher_finetune" in phases and phases.index("teacher_finetune") < phases.index("distill")
    assert any(m == "teacher_finetune finished" for _, m, _ in callbacks.events)
    assert results.metric == "accuracy" and _falling(results.training_history)
    assert results.training_history[0].losses["attention_kd"] > 0  # type: ignore[attr-defined]
    assert abs(results.compression_ratio - 0.4) / 0.4 <= 0.25
    assert results.onnx_export is not None and results.onnx_export["max_abs_difference"] < 1e-4

    # Compression stages, each re-measured; the int8 copy reloads from plain tensors.
    stages = {s.stage: s for s in results.compression_stages}
    assert list(stages) == ["distilled", "pruned", "int8"]
    assert stages["pruned"].linear_sparsity == pytest.approx(0.3, abs=0.02)
    assert stages["int8"].size_mb < stages["pruned"].size_mb / 2
    artifacts = paths.artifacts
    student = AutoModelForSequenceClassification.from_pretrained(artifacts).eval()
    int8 = load_int8_student(AutoModelForSequenceClassification.from_pretrained(artifacts), artifacts)
    assert (artifacts / INT8_WEIGHTS).is_file() and (artifacts / INT8_RECIPE).is_file()

    # Reloaded with plain transformers == torch.export program == ONNX, at two batch sizes / lengths.
    program = torch.export.load(str(artifacts / "student.pt2")).module()
    weights = student.bert.encoder.layer[0].attention.self.query.weight
    assert float((weights == 0).float().mean()) > 0.05  # the saved student is the pruned one
    for batch, length in ((1, 7), (5, 12)):
        ids = torch.randint(5, 40, (batch, length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = student(input_ids=ids, attention_mask=mask).logits
            assert torch.allclose(program(ids, mask), logits, atol=1e-5)
            assert torch.allclose(int8(input_ids=ids, attention_mask=mask).logits, logits, atol=0.1)
        onnx_logits = run_onnx(artifacts / "student.onnx", {"input_ids": ids, "attention_mask": mask})
        assert np.allclose(onnx_logits, logits.numpy(), atol=1e-4)

    # A second job on the same teacher and data reuses the fine-tuned teacher instead of training again.
    adapter = get_adapter("sequence-classification")
    data = adapter.load_data(spec, data_dir=workspace / "data", file_root=workspace)
    again = RecordingCallbacks()
    adapter.load_teacher(
        _source(workspace, "bert-base"),
        spec,
        data,
        data_dir=workspace / "data",
        file_root=workspace,
        device=torch.device("cpu"),
        callbacks=again,
        trust_remote_code=False,
    )
    assert [m for _, m, _ in again.events] == ["teacher_finetune reused"]


def test_bert_response_feature_attention_kd_losses_fall(workspace: Path) -> None:
    spec = _spec("sequence-classification", "cls.jsonl", "feature_distillation")
    adapter = get_adapter("sequence-classification")
    data = adapter.load_data(spec, data_dir=workspace / "data", file_root=workspace)
    teacher = adapter.load_teacher(
        _source(workspace, "bert-cls"),
        spec,
        data,
        data_dir=workspace / "data",
        file_root=workspace,
        device=torch.device("cpu"),
        callbacks=NullCallbacks(),
        trust_remote_code=False,
    )
    teacher.set_attn_implementation("eager")  # type: ignore[operator]
    with torch.no_grad():  # a confident random teacher with peaked attention, so every target carries signal
        torch.manual_seed(0)
        teacher.classifier.weight.normal_(0.0, 3.0)  # type: ignore[union-attr,operator]
        for layer in teacher.bert.encoder.layer:  # type: ignore[union-attr]
            layer.attention.self.query.weight.normal_(0.0, 0.5)
            layer.attention.self.key.weight.normal_(0.0, 0.5)
    student = adapter.build_student(teacher, 0.3, seed=0)  # narrower than the teacher: projections needed
    weights = {"soft_target_kl": 0.7, "hard_target_ce": 0.3, "feature_kd": 1.0, "attention_kd": 10.0}
    _, hidden, attentions = needs(weights)
    batch = next(iterate_batches(data.train, 16, None))[1]
    with torch.no_grad():
        teacher_out = adapter.forward(teacher, batch, hidden_states=True, attentions=True)
        probe = adapter.forward(student, batch, hidden_states=True)
    assert probe.hidden_states is not None and teacher_out.hidden_states is not None
    projector = FeatureProjector(
        [h.shape[-1] for h in probe.hidden_states], [h.shape[-1] for h in teacher_out.hidden_states]
    )
    assert any(isinstance(m, torch.nn.Linear) for m in projector.maps)
    optimizer = torch.optim.AdamW([*student.parameters(), *projector.parameters()], lr=3e-3)
    history: list[dict[str, float]] = []
    for _ in range(12):
        student_out = adapter.forward(student, batch, hidden_states=hidden, attentions=attentions)
        inputs = LossInputs(
            student=student_out,
            teacher=teacher_out,
            targets=adapter.targets(batch),
            temperature=4.0,
            projector=projector,
            attention_mask=batch["attention_mask"],
        )
        total, terms = combine_losses(weights, inputs)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append({"total": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}})
    for term in ("total", "soft_target_kl", "feature_kd", "attention_kd"):
        assert history[-1][term] < history[0][term], term


@pytest.mark.parametrize(
    ("task", "teacher_dir", "method", "auto_class"),
    [
        ("causal-lm", "gpt2", "response_distillation", AutoModelForCausalLM),
        ("masked-lm", "bert-mlm", "response_distillation", AutoModelForMaskedLM),
    ],
)
def test_language_model_distillation_end_to_end(
    workspace: Path, task: str, teacher_dir: str, method: str, auto_class: Any
) -> None:
    spec = _spec(task, "lm.jsonl", method, training={"teacher_cache": "on", "teacher_cache_top_k": 16})
    paths = JobPaths(workspace / f"job-{task}")
    results = run_job(
        spec,
        teacher=_source(workspace, teacher_dir),
        paths=paths,
        data_dir=workspace / "data",
        file_root=workspace,
    )
    assert results.metric == "perplexity"
    assert results.teacher_cache_used
    assert _falling(results.training_history)
    losses = results.training_history[0].losses  # type: ignore[attr-defined]
    assert losses["token_kl"] > 0
    if task == "masked-lm":
        assert losses["feature_kd"] > 0  # DistilBERT's hidden-state alignment term
    assert results.accuracy_retention == pytest.approx(results.teacher_accuracy / results.student_accuracy)

    student = auto_class.from_pretrained(paths.artifacts).eval()
    program = torch.export.load(str(paths.artifacts / "student.pt2")).module()
    for batch, length in ((1, 6), (3, 10)):
        ids = torch.randint(5, 40, (batch, length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            assert torch.allclose(
                program(ids, mask), student(input_ids=ids, attention_mask=mask).logits, atol=1e-4
            )
