"""The retention search on a language model: perplexity-based retention, sizes the family cannot build."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import lm_rows, save_tiny_gpt2, write_jsonl
from workers.distill.contract import JobPaths
from workers.distill.runner import run_job


def test_causal_lm_search_uses_perplexity_retention_and_records_unbuildable_sizes(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "lm.jsonl", lm_rows(80, seed=2))
    save_tiny_gpt2(tmp_path / "gpt2", layers=4, hidden=32, heads=4)
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "tiny",
            "task": "causal-lm",
            "target_retention": 0.5,
            "dataset_config": {"kind": "file", "path": "lm.jsonl"},
            "training_config": {
                "epochs": 1,
                "batch_size": 16,
                "learning_rate": 3e-3,
                "max_seq_length": 32,
                "max_trials": 4,
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
    assert results.metric == "perplexity" and results.search is not None
    built = [t for t in results.trials if t.error is None]
    assert built, results.trials
    for trial in built:
        # Lower is better: retention is the teacher's perplexity / the student's.
        assert trial.validation_accuracy is not None and trial.validation_retention is not None
        assert trial.validation_retention == pytest.approx(
            results.search.teacher_validation_accuracy / trial.validation_accuracy
        )
        assert trial.meets_target == (trial.validation_retention >= 0.5)
    # Sizes the family cannot build are recorded with why, never trained, and count as misses.
    for trial in results.trials:
        if trial.error is not None:
            assert not trial.meets_target and trial.parameters == 0 and "target_compression" in trial.error
    assert results.accuracy_retention == pytest.approx(results.teacher_accuracy / results.student_accuracy)
    assert results.target_met == (results.accuracy_retention >= 0.5)
