"""run_job end to end on digits: artifacts and export, exact resume, cancel, cache, progressive, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.checkpoint import load_checkpoint, save_checkpoint
from workers.distill.config import EngineConfig
from workers.distill.contract import (
    ARTIFACT_CONFIG,
    ARTIFACT_EXPORT,
    ARTIFACT_RESULTS,
    ARTIFACT_WEIGHTS,
    EngineError,
    JobPaths,
    JobStopped,
)
from workers.distill.runner import CHECKPOINT_FILE, resolve_teacher, run_job
from workers.distill.tasks.classification.models import build_model

REPO = Path(__file__).resolve().parents[2]
DIGITS_CNN = resolve_teacher("digits-cnn")


def tiny_spec(**training: Any) -> JobSpec:
    body = json.loads((REPO / "examples" / "tiny.json").read_text())
    body["training_config"].update(training)
    return JobSpec.model_validate(body)


def spec_with(**fields: Any) -> JobSpec:
    body = json.loads((REPO / "examples" / "tiny.json").read_text())
    body.update(fields)
    return JobSpec.model_validate(body)


def test_tiny_job_writes_measured_results_and_usable_artifacts(
    tmp_path: Path, data_dir: Path, recording: Any
) -> None:
    callbacks = recording()
    results = run_job(
        tiny_spec(), teacher=DIGITS_CNN, paths=JobPaths(tmp_path), data_dir=data_dir, callbacks=callbacks
    )

    assert results.teacher_accuracy >= 0.97
    assert 0.0 < results.initial_student_accuracy < results.best_student_accuracy <= 1.0
    assert results.compressed_parameters < results.original_parameters
    assert results.compression_ratio == pytest.approx(0.05, rel=0.05)
    assert results.latency_ms.student["batch_64"] > 0 and results.latency_ms.teacher["batch_1"] > 0
    assert results.inference_speedup == pytest.approx(
        results.latency_ms.teacher["batch_64"] / results.latency_ms.student["batch_64"]
    )
    assert results.cost_savings == pytest.approx(1 - 1 / results.inference_speedup)
    assert [h.epoch for h in results.training_history] == [1, 2]
    assert results.teacher_cache_used

    # Progress is monotone and ends at 1; each epoch produced a metric event; phases were announced.
    fractions = [p.fraction for p in callbacks.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [m["epoch"] for m in callbacks.metrics()] == [1, 2]
    phases = [d["phase"] for kind, _, d in callbacks.events if kind == "phase"]
    assert phases[:2] == ["data", "teacher"] and "distill" in phases and phases[-1] == "done"

    artifacts = tmp_path / "artifacts"
    stored = json.loads((artifacts / ARTIFACT_RESULTS).read_text())
    assert stored["best_student_accuracy"] == results.best_student_accuracy

    # The student rebuilds from safetensors + config, and the exported program equals it at two batch sizes.
    student = build_model(json.loads((artifacts / ARTIFACT_CONFIG).read_text()))
    student.load_state_dict(load_file(str(artifacts / ARTIFACT_WEIGHTS)))
    student.eval()
    program = torch.export.load(str(artifacts / ARTIFACT_EXPORT)).module()
    for batch in (1, 37):
        inputs = torch.rand(batch, 64)
        torch.testing.assert_close(program(inputs), student(inputs))

    # A finished student serves as a local teacher for another job (the runner accepts a path).
    source = resolve_teacher(str(artifacts))
    assert source.kind == TeacherSourceKind.local
    again = run_job(
        tiny_spec(epochs=1), teacher=source, paths=JobPaths(tmp_path / "from-student"), data_dir=data_dir
    )
    assert again.original_parameters == results.compressed_parameters
    assert again.teacher_accuracy == pytest.approx(results.student_accuracy)  # the delivered student


def test_builtin_teacher_is_built_once_and_reloaded(data_dir: Path) -> None:
    from workers.distill.contract import NullCallbacks
    from workers.distill.tasks.classification.data import load_digits_data
    from workers.distill.tasks.classification.teachers import get_digits_teacher

    data = load_digits_data()
    first, _ = get_digits_teacher(data_dir, data, NullCallbacks())  # built by an earlier test or now
    again, built_now = get_digits_teacher(data_dir, data, NullCallbacks())
    assert not built_now
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    )
    meta = json.loads((data_dir / "teachers" / "digits-cnn" / "meta.json").read_text())
    assert meta["test_accuracy"] >= 0.98 and meta["parameters"] < 1_000_000


def test_stop_then_resume_gives_identical_state(tmp_path: Path, data_dir: Path, recording: Any) -> None:
    spec = tiny_spec(epochs=3, baseline=True)
    straight = run_job(spec, teacher=DIGITS_CNN, paths=JobPaths(tmp_path / "a"), data_dir=data_dir)

    # Stop right after the first distillation epoch's checkpoint (the baseline run comes first).
    stopper = recording(stop_when=lambda cb: any(m["phase"] == "distill" for m in cb.metrics()))
    with pytest.raises(JobStopped):
        run_job(
            spec, teacher=DIGITS_CNN, paths=JobPaths(tmp_path / "b"), data_dir=data_dir, callbacks=stopper
        )
    checkpoint = load_checkpoint(tmp_path / "b" / "checkpoints" / CHECKPOINT_FILE)
    assert checkpoint["run_index"] == 1 and checkpoint["run"]["epoch"] == 1
    assert not (tmp_path / "b" / "artifacts" / ARTIFACT_RESULTS).exists()

    resumed_cb = recording()
    resumed = run_job(
        spec, teacher=DIGITS_CNN, paths=JobPaths(tmp_path / "b"), data_dir=data_dir, callbacks=resumed_cb
    )
    assert [m["epoch"] for m in resumed_cb.metrics()] == [2, 3]  # only the missing epochs ran

    a = load_file(str(tmp_path / "a" / "artifacts" / ARTIFACT_WEIGHTS))
    b = load_file(str(tmp_path / "b" / "artifacts" / ARTIFACT_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(straight.training_history, resumed.training_history, strict=True):
        assert (x.epoch, x.total_loss, x.student_accuracy) == (y.epoch, y.total_loss, y.student_accuracy)
    assert straight.baseline_accuracy == resumed.baseline_accuracy
    assert straight.kd_gain == pytest.approx(resumed.kd_gain)


def test_checkpoint_round_trips_nested_state_without_pickle(tmp_path: Path) -> None:
    payload = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]},
        "rng": torch.get_rng_state(),
        "history": [{"epoch": 1, "loss": 0.5, "note": None, "ok": True}],
    }
    save_checkpoint(tmp_path / "c.safetensors", payload)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded is not None
    assert torch.equal(loaded["optimizer"]["state"][0]["step"], torch.tensor(3.0))
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["rng"], payload["rng"]) and loaded["rng"].dtype == torch.uint8
    assert loaded["history"] == payload["history"]
    assert load_checkpoint(tmp_path / "absent.safetensors") is None


def test_cancel_mid_epoch_raises_and_keeps_a_checkpoint(
    tmp_path: Path, data_dir: Path, recording: Any
) -> None:
    # Stop at the first check that comes after a training step of the distillation run.
    stopper = recording(stop_when=lambda cb: any(p.phase == "distill" and p.step for p in cb.progress))
    with pytest.raises(JobStopped):
        run_job(
            tiny_spec(epochs=50),
            teacher=DIGITS_CNN,
            paths=JobPaths(tmp_path),
            data_dir=data_dir,
            callbacks=stopper,
        )
    assert (tmp_path / "checkpoints" / CHECKPOINT_FILE).is_file()
    assert len(stopper.metrics()) < 50


def test_a_run_that_may_not_write_leaves_the_jobs_files_to_the_next_attempt(
    tmp_path: Path, data_dir: Path, recording: Any
) -> None:
    """may_write() False (the worker's lease not renewed): no checkpoint, kept weights, artifact or
    results.json is written, the delivered student's files wait `write_wait_s` and then stop the run; a
    later run resumes from the last checkpoint that was allowed and finishes."""
    config = EngineConfig(write_wait_s=0.3)
    never = recording(write_when=lambda cb: False)
    with pytest.raises(JobStopped, match="lease was not renewed for 0 s"):
        run_job(
            tiny_spec(epochs=3),
            teacher=DIGITS_CNN,
            paths=JobPaths(tmp_path / "never"),
            data_dir=data_dir,
            callbacks=never,
            config=config,
        )
    assert len(never.metrics()) == 3 and never.write_checks > 3  # it trained; each write asked first
    assert not list((tmp_path / "never").rglob("*.safetensors")) and not list(
        (tmp_path / "never").rglob("*.json")
    )

    # Writes allowed until the second epoch's metric: epoch 2's checkpoint, written just before that
    # metric, is the last one on disk.
    paths = JobPaths(tmp_path / "cut")
    cut = recording(write_when=lambda cb: len(cb.metrics()) < 2)
    with pytest.raises(JobStopped):
        run_job(
            tiny_spec(epochs=4),
            teacher=DIGITS_CNN,
            paths=paths,
            data_dir=data_dir,
            callbacks=cut,
            config=config,
        )
    trained = [(m["phase"], m["epoch"]) for m in cut.metrics()]
    assert trained == [("distill", e) for e in range(1, 5)]  # it trained on; only the writes were skipped
    saved = load_checkpoint(paths.checkpoints / CHECKPOINT_FILE)
    assert saved is not None and (saved["run_index"], saved["run"]["epoch"]) == (0, 2)
    assert not (paths.artifacts / ARTIFACT_RESULTS).exists()
    resumed = recording()
    results = run_job(
        tiny_spec(epochs=4),
        teacher=DIGITS_CNN,
        paths=paths,
        data_dir=data_dir,
        callbacks=resumed,
        config=config,
    )
    assert [(m["phase"], m["epoch"]) for m in resumed.metrics()] == trained[2:]  # from the last checkpoint
    assert len(results.training_history) == 4 and (paths.artifacts / ARTIFACT_RESULTS).is_file()


def test_teacher_cache_on_and_off_give_the_same_first_epoch_loss(tmp_path: Path, data_dir: Path) -> None:
    cached = run_job(
        tiny_spec(epochs=1, teacher_cache="on"),
        teacher=DIGITS_CNN,
        paths=JobPaths(tmp_path / "on"),
        data_dir=data_dir,
    )
    live = run_job(
        tiny_spec(epochs=1, teacher_cache="off"),
        teacher=DIGITS_CNN,
        paths=JobPaths(tmp_path / "off"),
        data_dir=data_dir,
    )
    assert cached.teacher_cache_used and not live.teacher_cache_used
    assert cached.training_history[0].total_loss == pytest.approx(
        live.training_history[0].total_loss, rel=1e-5
    )
    assert cached.training_history[0].distillation_loss == pytest.approx(
        live.training_history[0].distillation_loss, rel=1e-5
    )


def test_progressive_stages_follow_the_geometric_schedule(tmp_path: Path, data_dir: Path) -> None:
    spec = spec_with(
        distillation_method="progressive_distillation",
        target_compression=0.01,
        training_config={"epochs": 1, "num_stages": 2, "learning_rate": 0.01, "device": "cpu"},
    )
    results = run_job(spec, teacher=DIGITS_CNN, paths=JobPaths(tmp_path), data_dir=data_dir)
    assert [s.stage for s in results.stages] == [1, 2]
    assert results.stages[0].compression_ratio == pytest.approx(0.1, rel=0.05)  # 0.01 ** (1/2)
    assert results.stages[1].compression_ratio == pytest.approx(0.01, rel=0.05)
    assert [s.temperature for s in results.stages] == [4.0, 5.0]
    assert [s.alpha for s in results.stages] == pytest.approx([0.7, 0.6])
    assert results.compressed_parameters == results.stages[1].parameters
    assert [h.stage for h in results.training_history] == [1, 2]


def test_feature_distillation_trains_with_a_projection(tmp_path: Path, data_dir: Path) -> None:
    spec = spec_with(
        distillation_method="feature_distillation", training_config={"epochs": 1, "feature_weight": 1.0}
    )
    results = run_job(spec, teacher=DIGITS_CNN, paths=JobPaths(tmp_path), data_dir=data_dir)
    losses = results.training_history[0].losses  # type: ignore[attr-defined]
    assert losses["feature_kd"] > 0
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / CHECKPOINT_FILE)
    assert checkpoint["completed"][-1]["kind"] == "distill"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_compression": 1.0}, "less than 1"),
        ({"target_compression": 0}, "greater than 0"),
        ({"training_config": {"temperature": 11}}, "less than or equal to 10"),
        ({"training_config": {"alpha": 1.5}}, "less than or equal to 1"),
        ({"training_config": {"epochs": 0}}, "greater than or equal to 1"),
        ({"distillation_method": "magic"}, "response_distillation"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
        ({"dataset_config": {"kind": "hub", "name": "imdb"}}, "takes the builtin 'digits' dataset"),
        ({"compression": {"quantize": "int4"}}, "'none' or 'int8'"),
        ({"dataset_config": {"kind": "ftp"}}, "builtin"),
    ],
)
def test_bad_specs_are_rejected_with_clear_messages(change: dict[str, Any], message: str) -> None:
    body = json.loads((REPO / "examples" / "tiny.json").read_text())
    body.update(change)
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(body)


def _expect_engine_error(
    code: str, match: str, spec: JobSpec, teacher: TeacherSource, tmp_path: Path, data_dir: Path, **kw: Any
) -> None:
    with pytest.raises(EngineError, match=match) as info:
        run_job(spec, teacher=teacher, paths=JobPaths(tmp_path / code), data_dir=data_dir, **kw)
    assert info.value.code == code


def test_engine_errors_are_specific(tmp_path: Path, data_dir: Path) -> None:
    uploaded = spec_with(dataset_config={"kind": "uploaded", "dataset_id": "abc"})
    _expect_engine_error("dataset_unresolved", "resolve", uploaded, DIGITS_CNN, tmp_path, data_dir)

    attention = spec_with(distillation_method="attention_distillation")
    _expect_engine_error("unsupported", "attention maps", attention, DIGITS_CNN, tmp_path, data_dir)

    outside = tmp_path / "outside.csv"
    outside.write_text("a,label\n1,0\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.csv").symlink_to(outside)
    escaped = spec_with(dataset_config={"kind": "file", "path": "link.csv"})
    _expect_engine_error(
        "path_outside_root", "outside the allowed", escaped, DIGITS_CNN, tmp_path, data_dir, file_root=root
    )

    missing = TeacherSource(
        name="x", kind=TeacherSourceKind.local, location=str(tmp_path / "nope"), type="local"
    )
    _expect_engine_error("teacher_not_found", "No directory at", tiny_spec(), missing, tmp_path, data_dir)
    with pytest.raises(EngineError, match="not one of digits-cnn"):
        resolve_teacher("no-such-teacher")


def test_non_finite_loss_fails_with_nan_loss(tmp_path: Path, data_dir: Path) -> None:
    # A local MLP teacher over a 4-feature table in which some values are infinite.
    from safetensors.torch import save_file

    from workers.distill.tasks.classification.models import MLP, model_config

    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    teacher = MLP(4, 2, [32])
    save_file(teacher.state_dict(), str(teacher_dir / "model.safetensors"))
    (teacher_dir / "config.json").write_text(json.dumps(model_config(teacher)))
    values = [f"{i % 7},{i % 3},1,{'inf' if i % 6 == 5 else 0},{i % 2}" for i in range(60)]
    rows = ["f1,f2,f3,f4,label", *values]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    spec = spec_with(target_compression=0.5, dataset_config={"kind": "file", "path": "table.csv"})
    source = TeacherSource(name="t", kind=TeacherSourceKind.local, location="teacher", type="local")
    _expect_engine_error("nan_loss", "learning_rate", spec, source, tmp_path, data_dir, file_root=tmp_path)
