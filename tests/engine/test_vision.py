"""Task image-classification end to end with tiny local models and digit PNGs the test writes.

Teachers are fitted here (tiny ResNet and ViT configs, a plain CNN exported as `.pt2`); students are derived
or named; every method must lower its own loss term; artifacts are reloaded and must match the module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from app.schemas.job_spec import JobSpec
from app.schemas.results import DistillationResults
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.vision_models import (
    DIGIT_NAMES,
    images_and_labels,
    save_fitted_teacher,
    save_program_teacher,
    tiny_config,
    write_digit_folders,
)
from workers.distill.contract import EngineError, JobPaths, NullCallbacks
from workers.distill.registry import get_adapter
from workers.distill.runner import named_student, run_job
from workers.distill.tasks.transformers.onnx_export import run_onnx

torch.set_num_threads(2)
SIZE = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("vision")
    write_digit_folders(base / "digits", per_class=10, size=SIZE)
    save_fitted_teacher("resnet", base / "resnet", base / "digits", size=SIZE, epochs=8)
    save_fitted_teacher("vit", base / "vit", base / "digits", size=SIZE, epochs=4)
    # An untrained 2-layer ViT: a named student that does not start from the teacher's attention maps.
    fresh = AutoModelForImageClassification.from_config(tiny_config("vit", size=SIZE))
    fresh.config.num_hidden_layers = 2
    AutoModelForImageClassification.from_config(fresh.config).save_pretrained(base / "vit-fresh")
    return base


def _source(location: str) -> TeacherSource:
    return TeacherSource(
        name=location, kind=TeacherSourceKind.local, location=location, type="image_classifier"
    )


def _spec(method: str = "response_distillation", **extra: Any) -> JobSpec:
    training = {
        "epochs": 3,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "temperature": 2.0,
        "teacher_cache": "on",
    }
    training.update(extra.pop("training", {}))
    body: dict[str, Any] = {
        "teacher_model_name": "tiny",
        "task": "image-classification",
        "distillation_method": method,
        "dataset_config": {"kind": "file", "path": "digits"},
        "training_config": training,
    }
    if "student" not in extra:
        body["target_compression"] = 0.3
    body.update(extra)
    return JobSpec.model_validate(body)


def _run(root: Path, name: str, spec: JobSpec, teacher: str) -> tuple[DistillationResults, Path]:
    paths = JobPaths(root / f"job-{name}")
    results = run_job(spec, teacher=_source(teacher), paths=paths, data_dir=root / "data", file_root=root)
    return results, paths.artifacts


def _term_falls(results: DistillationResults, term: str) -> tuple[float, float]:
    losses = [entry.losses[term] for entry in results.training_history]  # type: ignore[attr-defined]
    assert losses[-1] < losses[0], f"{term} did not fall: {losses}"
    return losses[0], losses[-1]


def test_resnet_response_kd_end_to_end_with_artifacts(root: Path) -> None:
    results, artifacts = _run(root, "resnet-response", _spec(training={"baseline": True}), "resnet")
    assert results.task == "image-classification" and results.metric == "accuracy"
    assert results.teacher_accuracy > 0.3  # fitted, well above chance (0.1)
    assert results.compressed_parameters < results.original_parameters
    assert 0.15 < results.compression_ratio < 0.5
    assert results.baseline_accuracy is not None and results.kd_gain_unit == "points"
    assert results.accuracy_retention == pytest.approx(results.student_accuracy / results.teacher_accuracy)
    extra = results.model_dump()
    assert set(extra["latency_ms"]["student"]) >= {"batch_1", "batch_64"}
    assert results.inference_speedup > 0
    assert extra["input_resolution"] == [SIZE, SIZE]
    assert extra["student_derivation"]["initialised_from"] == "teacher"
    assert extra["preprocessing"]["source"] == "teacher processor"
    _term_falls(results, "soft_target_kl")

    # save_pretrained reloads as an image classifier with the class names; student.pt2 takes any batch size
    # and matches it; the ONNX file matches too.
    reloaded = AutoModelForImageClassification.from_pretrained(artifacts).eval()
    assert reloaded.config.id2label[3] == DIGIT_NAMES[3]
    x, _y = images_and_labels(root / "digits", SIZE)
    program = torch.export.load(str(artifacts / "student.pt2")).module()
    with torch.no_grad():
        for batch in (1, 5, 64):
            expected = reloaded(pixel_values=x[:batch]).logits
            torch.testing.assert_close(program(x[:batch]), expected, atol=1e-4, rtol=1e-4)
    assert (
        extra["onnx_export"]["file"] == "student.onnx" and extra["onnx_export"]["max_abs_difference"] < 1e-3
    )
    onnx_logits = run_onnx(artifacts / "student.onnx", {"pixel_values": x[:7]})
    np.testing.assert_allclose(onnx_logits, expected[:7].numpy(), atol=1e-4)
    assert (artifacts / "preprocessor_config.json").is_file() and (
        artifacts / "student.safetensors"
    ).is_file()


@pytest.mark.parametrize(
    ("teacher", "method", "term", "student"),
    [
        ("resnet", "feature_distillation", "feature_map_hint", None),
        ("resnet", "attention_distillation", "attention_transfer", None),
        # A derived ViT starts from the teacher's layers (its attention maps already match): a fresh one.
        ("vit", "attention_distillation", "attention_kd", "vit-fresh"),
        ("vit", "feature_distillation", "feature_map_hint", None),
    ],
)
def test_each_method_lowers_its_loss(
    root: Path, teacher: str, method: str, term: str, student: str | None
) -> None:
    named = {"student": {"kind": "local", "path": student}} if student else {}
    spec = _spec(method, training={"epochs": 4, "feature_weight": 1.0, "attention_weight": 1.0}, **named)
    results, _ = _run(root, f"{teacher}-{method}", spec, teacher)
    assert term in results.training_history[0].losses  # type: ignore[attr-defined]
    _term_falls(results, term)


def test_progressive_stages_step_down_to_the_target(root: Path) -> None:
    spec = _spec("progressive_distillation", training={"epochs": 2, "num_stages": 2})
    results, _ = _run(root, "resnet-progressive", spec, "resnet")
    assert [s.stage for s in results.stages] == [1, 2]
    assert results.stages[0].parameters > results.stages[1].parameters  # type: ignore[attr-defined]
    assert results.compression_ratio < 0.5


def test_named_students_of_another_family(root: Path) -> None:
    """A MobileNetV2 config and a saved ViT (9 labels: a fresh head) for the ResNet teacher."""
    mobilenet = {"kind": "config", "overrides": {"model_type": "mobilenet_v2", "depth_multiplier": 0.25}}
    spec = _spec(student=mobilenet)
    adapter = get_adapter(spec.task)
    data = adapter.load_data(spec, data_dir=root / "data", file_root=root)
    teacher = adapter.load_teacher(
        _source("resnet"),
        spec,
        data,
        data_dir=root / "data",
        file_root=root,
        device=torch.device("cpu"),
        callbacks=NullCallbacks(),
        trust_remote_code=False,
    )
    named = named_student(spec)
    assert named is not None
    built = adapter.build_named_student(named, teacher, spec, data, file_root=root, trust_remote_code=False)
    assert (
        built.notes["architecture"] == "MobileNetV2ForImageClassification" and built.notes["new_head"] is True
    )
    assert built.model.config.num_labels == 10 and built.model.config.id2label[0] == DIGIT_NAMES[0]

    vit = AutoModelForImageClassification.from_config(tiny_config("vit", num_labels=9, size=SIZE))
    vit.save_pretrained(root / "vit-student")
    spec = _spec(
        "attention_distillation", student={"kind": "local", "path": "vit-student"}, training={"epochs": 2}
    )
    results, _ = _run(root, "named-vit", spec, "resnet")
    assert results.student["new_head"] is True and results.student["initialised_from"] == "pretrained"
    _term_falls(results, "attention_transfer")  # ResNet maps vs ViT patch-token grids

    # Same family with overrides: initialised from the teacher.
    spec = _spec(student={"kind": "config", "overrides": {"num_hidden_layers": 2}}, training={"epochs": 1})
    results, _ = _run(root, "named-vit-config", spec, "vit")
    assert results.student["initialised_from"] == "teacher" and results.compression_ratio < 0.7


def test_named_vit_at_another_resolution_is_refused(root: Path) -> None:
    vit = AutoModelForImageClassification.from_config(tiny_config("vit", size=32))
    vit.save_pretrained(root / "vit-32")
    with pytest.raises(EngineError) as info:
        _run(root, "vit-32", _spec(student={"kind": "local", "path": "vit-32"}), "resnet")
    assert info.value.code == "student_incompatible" and "32x32" in info.value.message


def test_pt2_teacher_with_preprocessing_in_the_job(root: Path) -> None:
    save_program_teacher(root / "cnn.pt2", root / "digits", size=SIZE, epochs=8)
    prep = {"preprocessing": {"size": [SIZE, SIZE], "mean": [0.5], "std": [0.5]}}
    results, artifacts = _run(root, "pt2", _spec(image_config=prep, training={"epochs": 3}), "cnn.pt2")
    assert results.teacher_accuracy > 0.3
    assert results.model_dump()["student_derivation"]["derived_for"].startswith(".pt2 teacher")
    _term_falls(results, "soft_target_kl")
    assert (artifacts / "student.pt2").is_file()

    with pytest.raises(EngineError) as info:
        _run(root, "pt2-noprep", _spec(), "cnn.pt2")
    assert info.value.code == "invalid_spec" and "image_config.preprocessing" in info.value.message
    with pytest.raises(EngineError) as info:
        _run(root, "pt2-feature", _spec("feature_distillation", image_config=prep), "cnn.pt2")
    assert info.value.code == "unsupported" and "logits only" in info.value.message


def test_augmentation_turns_the_teacher_cache_off_and_says_so(root: Path) -> None:
    image_config = {
        "augmentation": {"random_resized_crop": True, "crop_scale": [0.5, 1.0], "horizontal_flip": True}
    }
    spec = _spec(image_config=image_config, training={"epochs": 2, "teacher_cache": "auto"})
    assert spec.training_config.teacher_cache == "off"
    results, _ = _run(root, "augmented", spec, "resnet")
    assert results.teacher_cache_used is False
    assert results.model_dump()["augmentation"]["random_resized_crop"] is True
    with pytest.raises(ValueError, match="teacher_cache 'on' cannot be used"):
        _spec(image_config=image_config)  # _spec asks for the cache 'on'
