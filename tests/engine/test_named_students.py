"""Named students for the transformer tasks: a local save_pretrained model of another shape, config overrides,
registry names, and the compatibility checks (vocabulary, layer mapping) that refuse before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertTokenizer

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import (
    BERT_SPECIALS,
    classification_rows,
    save_tiny_bert,
    vocabulary,
    write_jsonl,
)
from workers.distill.contract import EngineError, JobPaths
from workers.distill.runner import run_job


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("named")
    write_jsonl(root / "cls.jsonl", classification_rows(600, seed=1))
    save_tiny_bert(root / "bert-base", head="none", layers=4, hidden=32, heads=4)
    # The named student: another shape (half the layers, half the width), its own random weights.
    save_tiny_bert(root / "small-bert", head="none", layers=2, hidden=16, heads=2, seed=7)
    # A student whose tokenizer has other words: refused (it would read the teacher's ids as other tokens).
    other = save_tiny_bert(root / "other-vocab", head="none", layers=2, hidden=16, heads=2)
    vocab = {t: i for i, t in enumerate([*BERT_SPECIALS, *vocabulary()[:-3], "zebra", "quartz", "vivid"])}
    BertTokenizer(vocab=vocab).save_pretrained(root / "other-vocab")
    del other
    return root


def _teacher() -> TeacherSource:
    return TeacherSource(
        name="bert-base", kind=TeacherSourceKind.local, location="bert-base", type="transformer"
    )


def _spec(student: dict[str, Any], method: str = "feature_distillation", **training: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher_model_name": "bert-base",
            "task": "sequence-classification",
            "student": student,
            "distillation_method": method,
            "dataset_config": {"kind": "file", "path": "cls.jsonl"},
            "training_config": {
                "epochs": 3,
                "batch_size": 16,
                "learning_rate": 1e-3,
                "temperature": 2.0,
                "max_seq_length": 32,
                "teacher_finetune_epochs": 4,
                **training,
            },
        }
    )


def _run(workspace: Path, spec: JobSpec, name: str) -> Any:
    return run_job(
        spec,
        teacher=_teacher(),
        paths=JobPaths(workspace / name),
        data_dir=workspace / "data",
        file_root=workspace,
    )


def _reloaded_matches_program(artifacts: Path) -> AutoModelForSequenceClassification:
    student = AutoModelForSequenceClassification.from_pretrained(artifacts).eval()
    program = torch.export.load(str(artifacts / "student.pt2")).module()
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(
            program(ids, mask), student(input_ids=ids, attention_mask=mask).logits, atol=1e-5
        )
    return student


def test_local_student_of_another_shape_is_distilled_and_reloads(workspace: Path) -> None:
    results = _run(workspace, _spec({"kind": "local", "path": "small-bert"}), "job-local")
    note = results.student
    assert note["kind"] == "local" and note["initialised_from"] == "pretrained"
    assert note["layers"] == 2 and note["hidden_size"] == 16 and note["teacher_layers"] == 4
    assert note["new_head"] is True  # a headless student got a classifier for the data's 3 labels
    assert note["projected"] is True and note["layer_mapping"] == [1, 2, 4]
    assert results.target_compression is None
    assert results.compression_ratio == pytest.approx(note["compression_ratio"])
    assert 0.05 < results.compression_ratio < 0.5
    assert results.training_history[0].losses["feature_kd"] > 0  # type: ignore[attr-defined]
    assert results.student_accuracy > results.initial_student_accuracy
    student = _reloaded_matches_program(workspace / "job-local" / "artifacts")
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 16
    print(f"local student retention {results.accuracy_retention:.3f} ratio {results.compression_ratio:.3f}")


def test_config_overrides_build_the_teachers_architecture_initialised_from_it(workspace: Path) -> None:
    overrides = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 64}
    spec = _spec({"kind": "config", "overrides": overrides}, "response_distillation")
    results = _run(workspace, spec, "job-config")
    note = results.student
    assert note["kind"] == "config" and note["initialised_from"] == "teacher"
    assert note["overrides"] == overrides and note["init_tensors"]["sliced"] > 0
    student = _reloaded_matches_program(workspace / "job-config" / "artifacts")
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 64
    assert results.student_accuracy >= results.initial_student_accuracy
    print(f"config student retention {results.accuracy_retention:.3f} ratio {results.compression_ratio:.3f}")


@pytest.mark.parametrize(
    ("student", "training", "message"),
    [
        ({"kind": "local", "path": "other-vocab"}, {}, "only in the student's: ['quartz', 'vivid', 'zebra']"),
        ({"kind": "config", "overrides": {"vocab_size": 99}}, {}, "may not change ['vocab_size']"),
        ({"kind": "config", "overrides": {"num_hiden_layers": 2}}, {}, "['num_hiden_layers'] are not fields"),
        ({"kind": "config", "overrides": {"hidden_size": 30}}, {}, "not a multiple of num_attention_heads 4"),
        ({"kind": "local", "path": "small-bert"}, {"layer_mapping": [0, 4]}, "needs 3 entries"),
        ({"kind": "local", "path": "missing"}, {}, "No directory at"),
    ],
)
def test_incompatible_students_are_refused_before_training(
    workspace: Path, student: dict[str, Any], training: dict[str, Any], message: str
) -> None:
    with pytest.raises(EngineError) as caught:
        _run(workspace, _spec(student, **training), "job-refused")
    assert message in caught.value.message
    assert caught.value.code in ("student_incompatible", "student_not_found")
    assert not (workspace / "job-refused" / "checkpoints").exists()  # refused before any training


def test_registry_student_and_a_language_model_student_from_overrides(workspace: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.engine.tiny_models import lm_rows, save_tiny_gpt2
    from workers.distill.runner import named_student

    # 'registry': the worker looks the name up in the database; here the lookup is the registry's function.
    registry = {
        "small-bert": TeacherSource(
            name="small-bert", kind=TeacherSourceKind.local, location="small-bert", type="transformer"
        )
    }
    # With a layer mapping set for feature KD (embeddings <- embeddings, layer 1 <- 1, layer 2 <- 3).
    spec = _spec({"kind": "registry", "name": "small-bert"}, epochs=1, layer_mapping=[0, 1, 3])
    resolved = named_student(spec, registry=registry.__getitem__)
    assert resolved is not None and resolved.source == registry["small-bert"]
    results = run_job(
        spec,
        teacher=_teacher(),
        paths=JobPaths(workspace / "job-registry"),
        data_dir=workspace / "data",
        file_root=workspace,
        student=resolved,
    )
    assert results.student["kind"] == "registry" and results.student["layers"] == 2
    assert results.student["layer_mapping"] == [0, 1, 3]
    print(
        f"registry student retention {results.accuracy_retention:.3f} ratio {results.compression_ratio:.3f}"
    )

    # causal-lm: GPT-2 config overrides (the aliases num_hidden_layers/hidden_size map to n_layer/n_embd).
    write_jsonl(workspace / "lm.jsonl", lm_rows(120, seed=2))
    save_tiny_gpt2(workspace / "gpt2", layers=4, hidden=32, heads=4)
    lm_spec = JobSpec.model_validate(
        {
            "teacher_model_name": "gpt2",
            "task": "causal-lm",
            "student": {
                "kind": "config",
                "overrides": {"num_hidden_layers": 2, "hidden_size": 16, "n_head": 2},
            },
            "dataset_config": {"kind": "file", "path": "lm.jsonl"},
            "training_config": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "max_seq_length": 32},
        }
    )
    gpt2 = TeacherSource(name="gpt2", kind=TeacherSourceKind.local, location="gpt2", type="causal_lm")
    lm = run_job(
        lm_spec,
        teacher=gpt2,
        paths=JobPaths(workspace / "job-lm"),
        data_dir=workspace / "data",
        file_root=workspace,
    )
    assert lm.metric == "perplexity" and lm.student["layers"] == 2 and lm.student["hidden_size"] == 16
    assert lm.student_accuracy < lm.initial_student_accuracy  # perplexity fell
    reloaded = AutoModelForCausalLM.from_pretrained(workspace / "job-lm" / "artifacts")
    assert reloaded.config.n_layer == 2 and reloaded.config.n_embd == 16
    print(f"causal-lm config student retention {lm.accuracy_retention:.3f} ratio {lm.compression_ratio:.3f}")


def test_masked_lm_local_student(workspace: Path) -> None:
    from transformers import AutoModelForMaskedLM

    from tests.engine.tiny_models import lm_rows

    write_jsonl(workspace / "mlm.jsonl", lm_rows(120, seed=4))
    save_tiny_bert(workspace / "bert-mlm", head="masked-lm", layers=4, hidden=32, heads=4)
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "bert-mlm",
            "task": "masked-lm",
            "student": {"kind": "local", "path": "small-bert"},  # headless: a new MLM head, said in results
            "dataset_config": {"kind": "file", "path": "mlm.jsonl"},
            "training_config": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "max_seq_length": 32},
        }
    )
    mlm = TeacherSource(name="bert-mlm", kind=TeacherSourceKind.local, location="bert-mlm", type="masked_lm")
    results = run_job(
        spec,
        teacher=mlm,
        paths=JobPaths(workspace / "job-mlm"),
        data_dir=workspace / "data",
        file_root=workspace,
    )
    assert results.student["new_head"] is True and results.student["projected"] is True
    assert results.training_history[0].losses["feature_kd"] > 0  # type: ignore[attr-defined]
    assert AutoModelForMaskedLM.from_pretrained(workspace / "job-mlm" / "artifacts").config.hidden_size == 16
    print(
        f"masked-lm local student retention {results.accuracy_retention:.3f} "
        f"ratio {results.compression_ratio:.3f}"
    )
