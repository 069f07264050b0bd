"""Data for the `classification` task: scikit-learn's digits, and numeric CSV/JSONL tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from app.core.paths import PathKind
from app.schemas.job_spec import BuiltinDataset, FileDataset, JobSpec
from workers.distill.contract import EngineError, resolve_local_path
from workers.distill.kernel import TaskData, TensorDictDataset

VALIDATION_FRACTION = 0.1


def _splits(features: np.ndarray, labels: np.ndarray, *, source: str) -> TaskData:
    """Test split as the issue fixes it, then a stratified validation slice from the rest."""
    try:
        x_rest, x_test, y_rest, y_test = train_test_split(
            features, labels, test_size=0.2, random_state=0, stratify=labels
        )
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=VALIDATION_FRACTION, random_state=0, stratify=y_rest
        )
    except ValueError as exc:
        raise EngineError("dataset_invalid", f"{source}: cannot split into train/val/test ({exc})") from exc

    def dataset(x: np.ndarray, y: np.ndarray) -> TensorDictDataset:
        return TensorDictDataset(
            {
                "inputs": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),  # (N, F)
                "labels": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),  # (N,)
            }
        )

    num_labels = int(labels.max()) + 1
    return TaskData(
        train=dataset(x_train, y_train),
        val=dataset(x_val, y_val),
        test=dataset(x_test, y_test),
        collate=None,
        num_labels=num_labels,
        info={"in_features": int(features.shape[1]), "source": source},
    )


def load_digits_data() -> TaskData:
    """scikit-learn digits: inputs float32 (N, 64) = pixel / 16, labels 0..9."""
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # (1797, 64)
    return _splits(features, digits.target.astype(np.int64), source="digits")


def load_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """A numeric CSV or JSONL table: every column but `label_column` is a feature."""
    rows: list[dict[str, object]]
    try:
        if path.suffix.lower() in {".jsonl", ".json"}:
            with path.open(encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        else:
            with path.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise EngineError("dataset_invalid", f"cannot read {path.name}: {exc}") from exc
    if not rows:
        raise EngineError("dataset_invalid", f"{path.name} has no rows")
    columns = [c for c in rows[0] if c != label_column]
    if label_column not in rows[0] or not columns:
        raise EngineError(
            "dataset_invalid",
            f"{path.name} needs a '{label_column}' column and at least one numeric feature column; "
            f"found columns {sorted(rows[0])}",
        )
    try:
        features = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float32)  # type: ignore[arg-type]
        labels = np.array([int(row[label_column]) for row in rows], dtype=np.int64)  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(
            "dataset_invalid",
            f"{path.name}: every row needs numeric values in {columns} "
            f"and an integer '{label_column}' ({exc})",
        ) from exc
    if labels.min() < 0:
        raise EngineError("dataset_invalid", f"{path.name}: labels must be integers 0..C-1")
    return features, labels


def load_classification_data(spec: JobSpec, *, file_root: Path | None) -> TaskData:
    """The job's data for task `classification`."""
    config = spec.dataset_config
    if isinstance(config, BuiltinDataset):
        return load_digits_data()
    if isinstance(config, FileDataset):
        path = resolve_local_path(
            config.path, file_root, kind=PathKind.file, what="dataset file", missing_code="dataset_invalid"
        )
        features, labels = load_table(path, config.label_column)
        return _splits(features, labels, source=path.name)
    if config.kind == "uploaded":
        raise EngineError(
            "dataset_unresolved", "an 'uploaded' dataset must be resolved to a file by the service first"
        )
    raise EngineError(
        "unsupported", f"dataset kind '{config.kind}' is not supported for task 'classification'"
    )
