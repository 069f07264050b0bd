"""Uploaded datasets: schema checks (UTF-8, a non-empty `text` column, integer labels), storage, lookup."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import cpu_pool
from app.core.config import Settings
from app.errors import NotFound, ServiceUnavailable, Unprocessable
from app.models import Dataset
from app.schemas.datasets import DatasetRead

logger = logging.getLogger("distillery.datasets")

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


# A partial upload is `.<dataset id>.<host>.<pid>.part` in the uploads folder, so that a process starting up
# can tell its own dead predecessors' leftovers from another live API process's upload in progress.
_PART_SUFFIX = ".part"
# Another host's partial upload is stale once it has not grown for this long (an upload writes as it goes).
STALE_PART_SECONDS = 3600.0


def part_path(settings: Settings, dataset_id: str) -> Path:
    """Where this process writes an upload while it arrives."""
    return settings.uploads_dir / f".{dataset_id}.{socket.gethostname()}.{os.getpid()}{_PART_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _is_stale_part(path: Path, *, host: str, now: float) -> bool:
    stem = path.name[1 : -len(_PART_SUFFIX)]
    owner, _, pid_text = stem.rpartition(".")
    _, _, owner_host = owner.partition(".")
    if owner_host == host and pid_text.isdigit():
        pid = int(pid_text)
        # Our own pid at start-up means a predecessor in a recycled pid (containers start as pid 1).
        return pid == os.getpid() or not _pid_alive(pid)
    try:
        return now - path.stat().st_mtime > STALE_PART_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_parts(settings: Settings) -> int:
    """Remove partial uploads left by killed processes (called at start-up); returns how many."""
    folder = settings.uploads_dir
    if not folder.is_dir():
        return 0
    host, now, removed = socket.gethostname(), time.time(), 0
    for path in folder.glob(f".*{_PART_SUFFIX}"):
        if _is_stale_part(path, host=host, now=now):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d partial upload(s) left by stopped processes", removed)
    return removed


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


@dataclass(frozen=True)
class UploadLimits:
    """Bounds that keep a schema check linear and short (MAX_UPLOAD_COLUMNS, MAX_UPLOAD_LINE_BYTES)."""

    max_columns: int
    max_line_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(max_columns=settings.max_upload_columns, max_line_bytes=settings.max_upload_line_bytes)


def _lines(path: Path, limits: UploadLimits) -> Iterator[tuple[int, str]]:
    """(line number, text) of each physical line; one longer than the limit is refused unread."""
    with path.open("rb") as handle:
        for number in itertools.count(1):
            raw = handle.readline(limits.max_line_bytes + 1)
            if not raw:
                return
            if len(raw) > limits.max_line_bytes:
                raise Unprocessable(
                    f"line {number}: longer than {limits.max_line_bytes} bytes (MAX_UPLOAD_LINE_BYTES).",
                    max_upload_line_bytes=limits.max_line_bytes,
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Unprocessable(f"line {number}: not UTF-8 text (byte {exc.start} of the line).") from exc


def _too_many_columns(where: str, count: int, limits: UploadLimits) -> Unprocessable:
    return Unprocessable(
        f"{where}: {count} columns, more than the limit of {limits.max_columns} (MAX_UPLOAD_COLUMNS).",
        max_upload_columns=limits.max_columns,
    )


def _shown_columns(columns: list[str], at_most: int = 10) -> str:
    head = ", ".join(repr(c[:40]) for c in columns[:at_most])
    return f"[{head}{', ...' if len(columns) > at_most else ''}]"


def _check_csv(path: Path, limits: UploadLimits) -> DatasetSummary:
    numbered = _lines(path, limits)
    current = {"line": 1}

    def text_lines() -> Iterator[str]:
        for number, text in numbered:
            current["line"] = number
            yield text

    reader = csv.reader(text_lines())
    header = next(reader, None)
    columns = list(header or [])
    if len(columns) > limits.max_columns:
        raise _too_many_columns("The CSV header", len(columns), limits)
    if TEXT_COLUMN not in columns:
        raise Unprocessable(
            f"The CSV header {_shown_columns(columns)} has no '{TEXT_COLUMN}' column; the first line must "
            f"name the columns (e.g. '{TEXT_COLUMN},{LABEL_COLUMN}')."
        )
    text_index = columns.index(TEXT_COLUMN)
    label_index = columns.index(LABEL_COLUMN) if LABEL_COLUMN in columns else None
    rows, max_label = 0, -1
    for values in reader:
        where = f"line {current['line']}"
        if not values:
            continue  # a blank line
        if len(values) > len(columns):
            raise Unprocessable(f"{where}: more values than the header's {len(columns)} columns.")
        _check_text(values[text_index] if text_index < len(values) else None, where)
        if label_index is not None:
            label = values[label_index] if label_index < len(values) else None
            max_label = max(max_label, _parse_label(label, where))
        rows += 1
    return _summary("csv", rows, columns, max_label if label_index is not None else None)


def _check_jsonl(path: Path, limits: UploadLimits) -> DatasetSummary:
    columns: dict[str, None] = {}  # insertion-ordered set: one hash lookup per key, linear in the file
    rows, max_label, has_label = 0, -1, False
    for line_number, line in _lines(path, limits):
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
        if len(record) > limits.max_columns:
            raise _too_many_columns(where, len(record), limits)
        columns.update(dict.fromkeys(record))
        if len(columns) > limits.max_columns:
            raise _too_many_columns(f"{where} (all lines so far)", len(columns), limits)
        if TEXT_COLUMN not in record:
            raise Unprocessable(f"{where}: no '{TEXT_COLUMN}' field.")
        _check_text(record[TEXT_COLUMN], where)
        if LABEL_COLUMN in record:
            has_label = True
            max_label = max(max_label, _parse_label(record[LABEL_COLUMN], where))
        elif has_label:
            raise Unprocessable(f"{where}: no '{LABEL_COLUMN}' field, though earlier lines have one.")
        rows += 1
    return _summary("jsonl", rows, list(columns), max_label if has_label else None)


def _summary(fmt: str, rows: int, columns: list[str], max_label: int | None) -> DatasetSummary:
    if rows == 0:
        raise Unprocessable("The dataset has no rows.")
    return DatasetSummary(
        format=fmt,
        num_rows=rows,
        columns=columns,
        num_labels=None if max_label is None else max_label + 1,
    )


def check_file(path: Path, fmt: str, limits: UploadLimits) -> DatasetSummary:
    """Schema-check a CSV or JSONL file in one linear pass; Unprocessable names the first bad line.

    CPU-bound: the API runs it in a pool process (`create_from_upload`), off its event loop and GIL.
    """
    try:
        return _check_csv(path, limits) if fmt == "csv" else _check_jsonl(path, limits)
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
    """Check an upload, move it to `uploads_dir/<id>.<ext>` and record it; the file is removed on error.

    The check runs in a pool process (`app.core.cpu_pool`): its pure-Python loop over every line would
    otherwise hold the API's GIL, stalling every other request for as long as it runs.
    """
    try:
        fmt = detect_format(filename, received_path)
        try:
            summary = cpu_pool.run(check_file, received_path, fmt, UploadLimits.from_settings(settings))
        except cpu_pool.CheckProcessDied as exc:
            raise ServiceUnavailable(
                "The upload's check stopped (its process died, e.g. out of memory); retry the upload."
            ) from exc
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
