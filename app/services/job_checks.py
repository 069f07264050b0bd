"""Create-time checks of what a client brings: a named student, held-out splits, numeric tables, programs.

Called by `jobs.check_spec`; every finding is a field error (422). Only what can be read without torch is
checked here (JSON configs, vocabularies, CSV/JSONL cells, the JSON inside a `.pt2`); the worker checks the
rest with the real libraries before training (Parquet and save_to_disk contents, hub models and data).
Paths were already checked under the tenant's file root by `file_roots.check_spec_sources` (stored
relative to it); here they are only located there to read the files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import Teacher
from app.schemas.job_spec import (
    ConfigStudent,
    FileSource,
    JobSpec,
    LocalStudent,
    RegistryStudent,
    Task,
)
from app.services import file_roots, model_info
from app.services import teachers as teachers_service

_TEXT_TASKS = (Task.sequence_classification, Task.causal_lm, Task.masked_lm)
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
# Config fields a 'config' student may not change (the engine refuses them too).
_FROZEN_FIELDS = ("vocab_size", "model_type", "architectures", "pad_token_id", "num_labels")
MAX_SCANNED_ROWS = 1_000_000


def _error(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "field": ".".join(str(p) for p in loc), "msg": msg, "type": kind}


def _table_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Header and rows of a CSV/TSV/JSONL file (None: not such a file, or unreadable: the worker says)."""
    suffix = path.suffix.lower()
    if suffix not in _TABLE_SUFFIXES or not model_info.probe(path.is_file):
        return None
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                rows = [row for _, row in zip(range(MAX_SCANNED_ROWS), reader, strict=False)]
                return list(reader.fieldnames or []), rows
            rows = []
            for line in handle:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= MAX_SCANNED_ROWS:
                    break
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return None
    if not rows or not all(isinstance(row, dict) for row in rows):
        return None
    return list(rows[0]), rows


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_numeric_table(
    source: FileSource, path: Path | None, loc: list[str | int], errors: list[dict[str, Any]]
) -> int | None:
    """Classification tables: feature columns present and numeric, labels integers; returns the width."""
    if path is None:
        return None
    table = _table_rows(path)
    if table is None:
        return None
    header, rows = table
    columns = source.feature_columns or [c for c in header if c != source.label_column]
    absent = [c for c in [source.label_column, *columns] if c not in header]
    if absent:
        errors.append(
            _error(
                [*loc, "feature_columns" if source.feature_columns else "label_column"],
                f"{path.name} has no column(s) {absent}; its columns are {header}",
                "missing_columns",
            )
        )
        return None
    for number, row in enumerate(rows, start=1):
        for column in columns:
            if not _is_number(row.get(column)):
                errors.append(
                    _error(
                        [*loc, "feature_columns"],
                        f"{path.name} row {number}: column '{column}' is {row.get(column)!r}, "
                        "not a number (feature columns must be numeric; name them with feature_columns)",
                        "not_numeric",
                    )
                )
                return None
        label = row.get(source.label_column)
        number_label = float(label) if _is_number(label) else -1.0  # type: ignore[arg-type]
        if number_label != int(number_label) or number_label < 0:
            errors.append(
                _error(
                    [*loc, "label_column"],
                    f"{path.name} row {number}: label '{source.label_column}' is {label!r}; "
                    "labels must be integers 0..C-1",
                    "not_numeric",
                )
            )
            return None
    return len(columns)


def _check_program_teacher(
    teacher: Teacher, path: Path, width: int | None, errors: list[dict[str, Any]]
) -> None:
    """A `.pt2` teacher's input, read from its JSON, against the table's feature count."""
    if path.suffix != ".pt2" or width is None:
        return
    info = model_info.program_info(path)
    if info is None or info.in_features is None:
        return  # not readable without torch: the worker checks it before training
    if info.in_features != width:
        sizes = ["batch", *info.inputs[0][0][1:]]
        errors.append(
            _error(
                ["dataset_config", "feature_columns"],
                f"Teacher '{teacher.name}' takes input {sizes} ({info.in_features} values per example, "
                f"{info.inputs[0][1]}); the data has {width} feature columns",
                "shape_mismatch",
            )
        )


def _located(session: Session, settings: Settings, tenant_id: str | None, stored: str) -> Path | None:
    """Where a stored (root-relative) path lies for `tenant_id`; None when server paths are off."""
    path = Path(stored)
    if path.is_absolute():  # rows from before the root rule
        return path
    root = file_roots.root_for(session, settings=settings, tenant_id=tenant_id)
    return root / path if root is not None else None


def _student_directory(
    session: Session, spec: JobSpec, settings: Settings, tenant_id: str | None
) -> Path | None:
    """The local directory of a registry/local student (checked by file_roots), if it has one."""
    student = spec.student
    if isinstance(student, RegistryStudent):
        row = teachers_service.get(session, name=student.name, tenant_id=tenant_id)
        if row is None or row.source_kind != "local":
            return None
        return _located(session, settings, row.tenant_id, row.location)
    if isinstance(student, LocalStudent):
        return _located(session, settings, tenant_id, student.path)
    return None


def _check_text_student(
    spec: JobSpec, teacher_dir: Path, student_dir: Path | None, errors: list[dict[str, Any]]
) -> None:
    """Transformer students: same vocabulary as the teacher, known override fields, a fitting mapping."""
    teacher_config = model_info.hf_config(teacher_dir)
    if teacher_config is None:
        return
    student_config: dict[str, Any] | None = None
    if isinstance(spec.student, ConfigStudent):
        overrides = spec.student.overrides
        unknown = sorted(k for k in overrides if k not in teacher_config and k not in _ATTRIBUTE_MAP)
        frozen = sorted(k for k in overrides if k in _FROZEN_FIELDS)
        if unknown:
            errors.append(
                _error(
                    ["student", "overrides"],
                    f"{unknown} are not fields of the teacher's {teacher_config['model_type']} config",
                    "unknown_field",
                )
            )
        if frozen:
            errors.append(
                _error(
                    ["student", "overrides"],
                    f"overrides may not change {frozen}: the student reads the teacher's tokens and "
                    "predicts the same labels",
                    "frozen_field",
                )
            )
        renamed = {(k if k in teacher_config else _ATTRIBUTE_MAP.get(k, k)): v for k, v in overrides.items()}
        student_config = {**teacher_config, **renamed}
    elif student_dir is not None and model_info.probe(student_dir.is_dir):
        student_config = model_info.hf_config(student_dir)
        if student_config is None:
            errors.append(
                _error(
                    ["student"],
                    f"{student_dir} has no transformers config.json; give a save_pretrained directory",
                    "not_a_model",
                )
            )
            return
        difference = None
        teacher_vocab, student_vocab = (
            model_info.vocabulary(teacher_dir),
            model_info.vocabulary(student_dir),
        )
        if teacher_vocab is not None and student_vocab is not None:
            difference = model_info.vocabulary_difference(teacher_vocab, student_vocab)
        elif student_config.get("vocab_size") != teacher_config.get("vocab_size"):
            # Without tokenizer files only the sizes compare; the same tokenizer padded to another size
            # (embedding rows rounded up) passes when the tokenizers can be read, and the worker slices.
            difference = (
                f"teacher vocab_size {teacher_config.get('vocab_size')}, "
                f"student {student_config.get('vocab_size')}"
            )
        sequence_kd = spec.task == Task.causal_lm and spec.training_config.sequence_kd
        if difference is not None and not sequence_kd:
            hint = (
                " Logit KD compares the two distributions token by token, so it needs one vocabulary; "
                "set training_config.sequence_kd: true to train on the teacher's generated text instead "
                "(no logits: the student keeps its own tokenizer)."
                if spec.task == Task.causal_lm
                else ""
            )
            errors.append(
                _error(
                    ["student"],
                    f"The student's vocabulary differs from the teacher's ({difference}); for "
                    "distillation on text the student must read the teacher's tokens and predict over them."
                    + hint,
                    "vocabulary_mismatch",
                )
            )
            return
    mapping = spec.training_config.layer_mapping
    if student_config is not None and mapping is not None:
        s_layers = _layers(student_config)
        t_layers = _layers(teacher_config)
        if (
            s_layers is not None
            and t_layers is not None
            and (len(mapping) != s_layers + 1 or max(mapping) > t_layers)
        ):
            errors.append(
                _error(
                    ["training_config", "layer_mapping"],
                    f"needs {s_layers + 1} entries (embeddings, then each of the student's {s_layers} "
                    f"layers), each a teacher hidden state 0..{t_layers}",
                    "layer_mapping_mismatch",
                )
            )


# transformers' attribute_map aliases (GPT-2 style configs store n_layer/n_embd/n_head).
_ATTRIBUTE_MAP = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head"}


def _layers(config: dict[str, Any]) -> int | None:
    value = config.get("num_hidden_layers", config.get("n_layer"))
    return int(value) if isinstance(value, int) else None


def check_brought(
    session: Session,
    *,
    spec: JobSpec,
    settings: Settings,
    tenant_id: str | None,
    errors: list[dict[str, Any]],
) -> JobSpec:
    """The create-time checks of issue 9 on a spec whose paths passed `file_roots`; appends field errors."""
    student_dir = _student_directory(session, spec, settings, tenant_id)
    teacher = teachers_service.get(session, name=spec.teacher_model_name, tenant_id=tenant_id)
    teacher_path = (
        _located(session, settings, teacher.tenant_id, teacher.location)
        if teacher is not None and teacher.source_kind == "local"
        else None
    )
    if spec.task == Task.classification:
        width: int | None = None
        dataset = spec.dataset_config
        if isinstance(dataset, FileSource):
            width = _check_numeric_table(
                dataset, _located(session, settings, tenant_id, dataset.path), ["dataset_config"], errors
            )
        for role in ("validation", "test"):
            source = getattr(dataset, role)
            if isinstance(source, FileSource):
                if source.feature_columns is None and isinstance(dataset, FileSource):
                    source = source.model_copy(update={"feature_columns": dataset.feature_columns})
                located = _located(session, settings, tenant_id, source.path)
                _check_numeric_table(source, located, ["dataset_config", role], errors)
        if teacher is not None and teacher_path is not None:
            _check_program_teacher(teacher, teacher_path, width, errors)
    elif spec.task in _TEXT_TASKS and teacher_path is not None:
        _check_text_student(spec, teacher_path, student_dir, errors)
    elif spec.task == Task.image_classification and teacher is not None and teacher_path is not None:
        _check_image_program(spec, teacher, teacher_path, errors)
    return spec


def _check_image_program(spec: JobSpec, teacher: Teacher, path: Path, errors: list[dict[str, Any]]) -> None:
    """A `.pt2` image teacher needs the job's preprocessing, and its input must be the (C, H, W) it gives."""
    if path.suffix != ".pt2":
        return
    given = spec.image_config.preprocessing if spec.image_config else None
    if given is None:
        errors.append(
            _error(
                ["image_config", "preprocessing"],
                f"Teacher '{teacher.name}' is a .pt2 program: give image_config.preprocessing (size, mean, "
                "std) saying how its images were prepared",
                "missing",
            )
        )
        return
    info = model_info.program_info(path)
    if info is None or len(info.inputs) != 1:
        return  # the worker checks it against the data before training
    sizes = info.inputs[0][0][1:]
    expected = [given.channels, *given.size]
    if len(sizes) != 3 or any(s is not None and s != e for s, e in zip(sizes, expected, strict=True)):
        errors.append(
            _error(
                ["image_config", "preprocessing", "size"],
                f"Teacher '{teacher.name}' takes input {['batch', *sizes]}; the preprocessing gives "
                f"{['batch', *expected]} (channels, height, width)",
                "shape_mismatch",
            )
        )
