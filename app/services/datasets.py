"""Uploaded datasets: schema checks (UTF-8, a non-empty `text` column, integer labels), storage, lookup."""

from __future__ import annotations

import csv
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import NotFound, Unprocessable
from app.models import Dataset
from app.schemas.datasets import DatasetRead

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
_INTEGER = re.compile(r"^[+-]?[0-9]{1,18}$")
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class DatasetSummary:
    """What a schema check found in a file."""

    format: str
    num_rows: int
    columns: list[str]
    num_labels: int | None


def new_dataset_id() -> str:
    return str(uuid.uuid4())


def detect_format(filename: str, path: Path) -> str:
    """csv or jsonl, from the extension, else from the first non-blank character ('{' means JSONL)."""
    by_extension = _EXTENSIONS.get(Path(filename).suffix.lower())
    if by_extension:
        return by_extension
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    return "jsonl" if head.startswith(b"{") else "csv"


# Labels are class indices; a classification head needs max(label) + 1 outputs, so they are capped.
MAX_LABEL = 9_999


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise Unprocessable(f"{where}: label {value!r} is not an integer >= 0.")
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and _INTEGER.match(value.strip()):
        label = int(value.strip())
    else:
        raise Unprocessable(f"{where}: label {value!r} is not an integer >= 0.")
    if label < 0:
        raise Unprocessable(f"{where}: label {label} is negative; labels are integers >= 0.")
    if label > MAX_LABEL:
        raise Unprocessable(
            f"{where}: label {label} is out of range; labels are class indices 0..{MAX_LABEL}."
        )
    return label


def _check_text(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise Unprocessable(f"{where}: the '{TEXT_COLUMN}' value is empty or not a string.")


def _check_csv(path: Path) -> DatasetSummary:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        if TEXT_COLUMN not in columns:
            raise Unprocessable(
                f"The CSV header {columns} has no '{TEXT_COLUMN}' column; the first line must name "
                "the columns "
                f"(e.g. '{TEXT_COLUMN},{LABEL_COLUMN}')."
            )
        rows, max_label = 0, -1
        for line_number, row in enumerate(reader, start=2):
            where = f"line {line_number}"
            if None in row:
                raise Unprocessable(f"{where}: more values than the header's {len(columns)} columns.")
            _check_text(row.get(TEXT_COLUMN), where)
            if LABEL_COLUMN in columns:
                max_label = max(max_label, _parse_label(row.get(LABEL_COLUMN), where))
            rows += 1
    return _summary("csv", rows, columns, max_label if LABEL_COLUMN in columns else None)


def _check_jsonl(path: Path) -> DatasetSummary:
    columns: list[str] = []
    rows, max_label, has_label = 0, -1, False
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Unprocessable(f"{where}: not valid JSON ({exc.msg}).") from exc
            except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit parsing limit
                raise Unprocessable(f"{where}: not valid JSON ({exc}).") from exc
            except RecursionError as exc:
                raise Unprocessable(f"{where}: JSON nested too deeply.") from exc
            if not isinstance(record, dict):
                raise Unprocessable(f"{where}: each line must be a JSON object.")
            for key in record:
                if key not in columns:
                    columns.append(key)
            if TEXT_COLUMN not in record:
                raise Unprocessable(f"{where}: no '{TEXT_COLUMN}' field.")
            _check_text(record[TEXT_COLUMN], where)
            if LABEL_COLUMN in record:
                has_label = True
                max_label = max(max_label, _parse_label(record[LABEL_COLUMN], where))
            elif has_label:
                raise Unprocessable(f"{where}: no '{LABEL_COLUMN}' field, though earlier lines have one.")
            rows += 1
    return _summary("jsonl", rows, columns, max_label if has_label else None)


def _summary(fmt: str, rows: int, columns: list[str], max_label: int | None) -> DatasetSummary:
    if rows == 0:
        raise Unprocessable("The dataset has no rows.")
    return DatasetSummary(
        format=fmt,
        num_rows=rows,
        columns=columns,
        num_labels=None if max_label is None else max_label + 1,
    )


def check_file(path: Path, fmt: str) -> DatasetSummary:
    """Schema-check a CSV or JSONL file; Unprocessable names the first bad line."""
    try:
        return _check_csv(path) if fmt == "csv" else _check_jsonl(path)
    except UnicodeDecodeError as exc:
        raise Unprocessable(f"The file is not UTF-8 text (byte offset {exc.start}).") from exc
    except csv.Error as exc:
        raise Unprocessable(f"The CSV is malformed: {exc}.") from exc


def create_from_upload(
    session: Session,
    *,
    dataset_id: str,
    received_path: Path,
    filename: str,
    name: str | None,
    size_bytes: int,
    sha256: str,
    settings: Settings,
    tenant_id: str | None,
) -> Dataset:
    """Check an upload, move it to `uploads_dir/<id>.<ext>` and record it; the file is removed on error."""
    try:
        fmt = detect_format(filename, received_path)
        summary = check_file(received_path, fmt)
        final_path = settings.uploads_dir / f"{dataset_id}.{fmt}"
        received_path.replace(final_path)
    except BaseException:
        received_path.unlink(missing_ok=True)
        raise
    dataset = Dataset(
        id=dataset_id,
        name=(name or filename or dataset_id)[:200],
        format=summary.format,
        path=str(final_path),
        size_bytes=size_bytes,
        num_rows=summary.num_rows,
        columns={"names": summary.columns, "num_labels": summary.num_labels},
        sha256=sha256,
        tenant_id=tenant_id,
    )
    session.add(dataset)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        final_path.unlink(missing_ok=True)
        raise
    return dataset


def get(session: Session, *, dataset_id: str, tenant_id: str | None) -> Dataset | None:
    """The dataset, if it exists and belongs to `tenant_id` (None: any tenant, for workers)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or (tenant_id is not None and dataset.tenant_id != tenant_id):
        return None
    return dataset


def get_or_raise(session: Session, *, dataset_id: str, tenant_id: str | None) -> Dataset:
    dataset = get(session, dataset_id=dataset_id, tenant_id=tenant_id)
    if dataset is None:
        raise NotFound(f"No dataset with id '{dataset_id}'; GET /distillation/datasets lists them.")
    return dataset


def get_dataset_path(session: Session, dataset_id: str) -> Path:
    """Where an uploaded dataset's file lies (for workers); NotFound if the id is unknown."""
    return Path(get_or_raise(session, dataset_id=dataset_id, tenant_id=None).path)


def list_all(session: Session, *, tenant_id: str | None) -> list[Dataset]:
    """The tenant's datasets, newest first."""
    query = select(Dataset)
    if tenant_id is not None:
        query = query.where(Dataset.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(Dataset.created_at.desc(), Dataset.id.desc())).all())


def to_read(dataset: Dataset) -> DatasetRead:
    columns = dataset.columns or {}
    return DatasetRead(
        dataset_id=dataset.id,
        name=dataset.name,
        format=dataset.format,
        size_bytes=dataset.size_bytes,
        num_rows=dataset.num_rows,
        columns=list(columns.get("names", [])),
        num_labels=columns.get("num_labels"),
        sha256=dataset.sha256,
        created_at=dataset.created_at,
    )
