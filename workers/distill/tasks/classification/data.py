"""Data for the `classification` task: scikit-learn's digits, and numeric CSV/JSONL tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from app.core.paths import PathKind
from app.schemas.job_spec import BuiltinDataset, FileSource, HubSource, JobSpec, UploadedSource
from workers.distill.contract import EngineError, resolve_local_path
from workers.distill.kernel import TaskData, TensorDictDataset
from workers.distill.tables import Table, read_path, split_report

VALIDATION_FRACTION = 0.1


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDictDataset:
    return TensorDictDataset(
        {
            "inputs": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),  # (N, F)
            "labels": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),  # (N,)
        }
    )


def _splits(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    source: str,
    validation: tuple[np.ndarray, np.ndarray, str] | None = None,
    test: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> TaskData:
    """Test split as the issue fixes it (20%), then a stratified validation slice from the rest; a split
    the client gave (`validation`/`test`: features, labels, origin) is used instead of carving it."""
    try:
        if test is None:
            x_rest, x_test, y_rest, y_test = train_test_split(
                features, labels, test_size=0.2, random_state=0, stratify=labels
            )
        else:
            x_rest, y_rest = features, labels
            x_test, y_test = test[0], test[1]
        if validation is None:
            x_train, x_val, y_train, y_val = train_test_split(
                x_rest, y_rest, test_size=VALIDATION_FRACTION, random_state=0, stratify=y_rest
            )
        else:
            x_train, y_train = x_rest, y_rest
            x_val, y_val = validation[0], validation[1]
    except ValueError as exc:
        raise EngineError("dataset_invalid", f"{source}: cannot split into train/val/test ({exc})") from exc

    num_labels = int(max(labels.max(), y_val.max(), y_test.max())) + 1
    report = split_report(
        (source, len(y_train)),
        (validation[2] if validation else source, len(y_val), validation is not None),
        (test[2] if test else source, len(y_test), test is not None),
    )
    return TaskData(
        train=_dataset(x_train, y_train),
        val=_dataset(x_val, y_val),
        test=_dataset(x_test, y_test),
        collate=None,
        num_labels=num_labels,
        info={"in_features": int(features.shape[1]), "source": source, "splits": report},
    )


def load_digits_data() -> TaskData:
    """scikit-learn digits: inputs float32 (N, 64) = pixel / 16, labels 0..9."""
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # (1797, 64)
    return _splits(features, digits.target.astype(np.int64), source="digits")


def _numeric(value: object) -> float:
    """A number from a table cell (numbers, or strings that parse as one); ValueError otherwise.

    'inf'/'nan' parse (they are floats); training on them fails with `nan_loss`, naming the remedy.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(repr(value))
    return float(value)  # type: ignore[arg-type]


def table_arrays(
    table: Table, label_column: str, feature_columns: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features (N, F) float32, labels (N,) int64, the feature columns) of a numeric table.

    `feature_columns` None: every column but the label. A non-numeric cell or label is refused with its
    row (1-based data row) and column.
    """
    names = table.column_names
    columns = feature_columns if feature_columns is not None else [c for c in names if c != label_column]
    absent = [c for c in [label_column, *columns] if c not in table.columns]
    if absent or not columns:
        raise EngineError(
            "dataset_invalid",
            f"{table.origin} needs a '{label_column}' column and at least one numeric feature column; "
            f"lacks {absent or 'feature columns'}; found columns {sorted(names)}",
        )
    rows = table.rows
    features = np.empty((rows, len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        values = table.columns[column]
        for i, value in enumerate(values):
            try:
                features[i, j] = _numeric(value)
            except (TypeError, ValueError):
                raise EngineError(
                    "dataset_invalid",
                    f"{table.origin} row {i + 1}: column '{column}' is {value!r}, not a number "
                    "(feature columns must be numeric)",
                ) from None
    labels = np.empty(rows, dtype=np.int64)
    for i, value in enumerate(table.columns[label_column]):
        try:
            number = _numeric(value)
            if not np.isfinite(number) or number != int(number) or number < 0:
                raise ValueError(value)
        except (TypeError, ValueError):
            raise EngineError(
                "dataset_invalid",
                f"{table.origin} row {i + 1}: label '{label_column}' is {value!r}; labels must be "
                "integers 0..C-1",
            ) from None
        labels[i] = int(number)
    return features, labels, columns


def _read_numeric(
    source: FileSource | UploadedSource | HubSource,
    file_root: Path | None,
    role: str,
    feature_columns: list[str] | None,
) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    if not isinstance(source, FileSource):
        raise EngineError(
            "dataset_unresolved" if source.kind == "uploaded" else "unsupported",
            f"dataset kind '{source.kind}' must be a file for task 'classification'",
        )
    path = resolve_local_path(
        source.path, file_root, kind=PathKind.any, what="dataset file", missing_code="dataset_invalid"
    )
    table = read_path(path, None, role=role)
    features, labels, columns = table_arrays(
        table, source.label_column, source.feature_columns or feature_columns
    )
    return features, labels, table.origin, columns


def load_classification_data(spec: JobSpec, *, file_root: Path | None) -> TaskData:
    """The job's data for task `classification`: digits, or a numeric table (and given held-out sets)."""
    config = spec.dataset_config
    if isinstance(config, BuiltinDataset) and config.validation is None and config.test is None:
        return load_digits_data()
    if isinstance(config, BuiltinDataset):
        raise EngineError(
            "unsupported", "the builtin digits dataset has its own splits; give a file to bring your own"
        )
    features, labels, origin, columns = _read_numeric(config, file_root, "train", None)
    held_out: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for role, source in (("validation", config.validation), ("test", config.test)):
        if source is None:
            continue
        # A held-out set takes the training set's feature columns unless it names its own.
        x, y, where, _ = _read_numeric(source, file_root, role, columns)
        if x.shape[1] != features.shape[1]:
            raise EngineError(
                "dataset_invalid",
                f"the {role} set {where} has {x.shape[1]} feature columns, "
                f"the training data {features.shape[1]}",
            )
        held_out[role] = (x, y, where)
    data = _splits(
        features, labels, source=origin, validation=held_out.get("validation"), test=held_out.get("test")
    )
    data.info["feature_columns"] = columns
    return data
