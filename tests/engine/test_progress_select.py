"""One monotone progress figure over a job; the delivered epoch (select); a signed KD gain with its unit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import lm_rows, save_tiny_gpt2, write_jsonl
from workers.distill.contract import ARTIFACT_CONFIG, ARTIFACT_WEIGHTS, JobPaths
from workers.distill.kernel import iterate_batches
from workers.distill.registry import get_adapter
from workers.distill.runner import PROGRESS_TABLE, kd_gain, resolve_teacher, run_job
from workers.distill.tasks.classification.data import load_digits_data
from workers.distill.tasks.classification.models import build_model

REPO = Path(__file__).resolve().parents[2]
DIGITS_CNN = resolve_teacher("digits-cnn")


def digits_spec(method: str = "response_distillation", **training: Any) -> JobSpec:
    body = json.loads((REPO / "examples" / "tiny.json").read_text())
    body["distillation_method"] = method
    body["training_config"].update(training)
    return JobSpec.model_validate(body)


def test_progress_never_decreases_over_a_job_with_baseline_progressive_stages_and_compression(
    tmp_path: Path, data_dir: Path, recording: Any
) -> None:
    body = digits_spec("progressive_distillation", epochs=2, baseline=True, num_stages=2).model_dump()
    body["compression"] = {"prune_amount": 0.3, "quantize": "int8"}
    callbacks = recording()
    run_job(
        JobSpec.model_validate(body),
        teacher=DIGITS_CNN,
        paths=JobPaths(tmp_path),
        data_dir=data_dir,
        callbacks=callbacks,
    )

    samples = [(p.phase, p.fraction) for p in callbacks.progress]
    fractions = [fraction for _, fraction in samples]
    backwards = [(a, b) for a, b in itertools.pairwise(samples) if b[1] < a[1]]
    assert not backwards, f"progress went backwards: {backwards}"
    assert fractions[-1] == 1.0 and samples[-1][0] == "done"
    assert all(0.0 <= f <= 1.0 for f in fractions)

    # Every phase was sampled, in order, and training ran inside its slice of the table.
    phases = list(dict.fromkeys(phase for phase, _ in samples))
    assert phases == ["data", "teacher", "baseline", "distill", "evaluate", "compress", "export", "done"]
    start, end = PROGRESS_TABLE["training"]
    training = [f for phase, f in samples if phase in ("baseline", "distill")]
    assert start <= min(training) and max(training) <= end + 1e-9
    # Three runs of equal epochs x steps: the baseline ends a third into the training slice, and each
    # distillation stage starts where the previous run ended (not back at the slice's start).
    baseline_end = max(f for phase, f in samples if phase == "baseline")
    assert baseline_end == pytest.approx(start + (end - start) / 3)
    stage_starts = [
        f
        for (phase, f), progress in zip(samples, callbacks.progress, strict=True)
        if phase == "distill" and progress.epoch is None
    ]
    assert stage_starts == pytest.approx([start + (end - start) / 3, start + 2 * (end - start) / 3])


def _delivered_test_accuracy(artifacts: Path) -> float:
    """Accuracy of the shipped student.safetensors on the digits test split, measured here."""
    student = build_model(json.loads((artifacts / ARTIFACT_CONFIG).read_text()))
    student.load_state_dict(load_file(str(artifacts / ARTIFACT_WEIGHTS)))
    data = load_digits_data()
    adapter = get_adapter("classification")
    loader = (batch for _, batch in iterate_batches(data.test, 256, data.collate))
    return adapter.evaluate(student, loader, torch.device("cpu"))


# Settings under which the best validation epoch is not the last one (checked below), so the two rules
# deliver different students.
SELECT_SETTINGS = {"epochs": 6, "learning_rate": 0.05, "batch_size": 32, "seed": 1}


@pytest.fixture(scope="module")
def select_runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    runs = {}
    for select in ("best_validation", "last"):
        paths = JobPaths(tmp_path_factory.mktemp(select))
        results = run_job(
            digits_spec(**SELECT_SETTINGS, select=select), teacher=DIGITS_CNN, paths=paths, data_dir=data_dir
        )
        runs[select] = (results, paths)
    return runs


def test_select_last_delivers_the_last_epoch(select_runs: dict[str, Any]) -> None:
    results, paths = select_runs["last"]
    assert results.selected_by == "last"
    assert results.selected_epoch == SELECT_SETTINGS["epochs"]
    assert results.student_accuracy == results.final_student_accuracy
    assert results.student_accuracy == pytest.approx(_delivered_test_accuracy(paths.artifacts))
    assert results.accuracy_retention == pytest.approx(results.student_accuracy / results.teacher_accuracy)
    assert (results.metric_direction, results.metric_split) == ("higher_is_better", "test")


def test_select_best_validation_delivers_the_best_validation_epoch(select_runs: dict[str, Any]) -> None:
    results, paths = select_runs["best_validation"]
    history = [(h.student_accuracy, -h.epoch) for h in results.training_history]
    best_epoch = -max(history)[1]  # the first epoch with the highest validation accuracy
    assert best_epoch != SELECT_SETTINGS["epochs"], "these settings must peak before the last epoch"
    assert results.selected_by == "best_validation"
    assert results.selected_epoch == best_epoch
    assert results.student_accuracy == results.best_student_accuracy
    assert results.student_accuracy == pytest.approx(_delivered_test_accuracy(paths.artifacts))
    # Same training either way: the two rules differ only in which weights ship.
    last, _ = select_runs["last"]
    assert results.final_student_accuracy == last.final_student_accuracy
    assert results.best_student_accuracy == last.best_student_accuracy
    # ... and different weights ship.
    best_weights = load_file(str(paths.artifacts / ARTIFACT_WEIGHTS))
    last_weights = load_file(str(select_runs["last"][1].artifacts / ARTIFACT_WEIGHTS))
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)


def test_kd_gain_is_positive_when_kd_is_better_in_the_metric_s_own_direction() -> None:
    # The figures: digits accuracy (higher is better) and a causal LM's perplexity (lower is better).
    assert kd_gain(student=0.9861, baseline=0.9583, higher_is_better=True) == (
        pytest.approx(2.78),
        "points",
    )
    assert kd_gain(student=3.297, baseline=3.207, higher_is_better=False) == (
        pytest.approx(-0.09),
        "perplexity",
    )
    assert kd_gain(student=3.1, baseline=3.2, higher_is_better=False)[0] == pytest.approx(0.1)


def test_causal_lm_job_where_kd_loses_reports_a_negative_gain_in_perplexity(tmp_path: Path) -> None:
    # A random-init teacher and alpha=1.0: the KD student learns only the teacher's noise, while the
    # labels-only baseline learns the sentences. KD must lose, and say so with the right sign and unit.
    write_jsonl(tmp_path / "lm.jsonl", lm_rows(120, seed=2))
    save_tiny_gpt2(tmp_path / "gpt2", layers=2, hidden=32, heads=4)
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "tiny",
            "task": "causal-lm",
            "target_compression": 0.5,
            "distillation_method": "response_distillation",
            "dataset_config": {"kind": "file", "path": "lm.jsonl"},
            "training_config": {
                "epochs": 3,
                "batch_size": 16,
                "learning_rate": 3e-3,
                "temperature": 1.0,
                "alpha": 1.0,
                "max_seq_length": 32,
                "baseline": True,
                "device": "cpu",
            },
        }
    )
    results = run_job(
        spec,
        teacher=TeacherSource(name="gpt2", kind=TeacherSourceKind.local, location="gpt2", type="transformer"),
        paths=JobPaths(tmp_path / "job"),
        data_dir=tmp_path / "data",
        file_root=tmp_path,
    )
    assert results.metric == "perplexity" and results.metric_direction == "lower_is_better"
    assert results.baseline_accuracy is not None and results.student_accuracy is not None
    assert results.student_accuracy > results.baseline_accuracy  # KD's perplexity is worse
    assert results.kd_gain_unit == "perplexity"
    assert results.kd_gain == pytest.approx(results.baseline_accuracy - results.student_accuracy)
    assert results.kd_gain < 0
    assert results.accuracy_retention == pytest.approx(results.teacher_accuracy / results.student_accuracy)
