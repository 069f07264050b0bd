"""Reading a dataset source as columns: CSV/TSV/JSONL, Parquet, `save_to_disk` directories, hub datasets.

Shared by every task (imports no task). Files are read as plain rows; Parquet, `save_to_disk` and hub
datasets go through Hugging Face `datasets` (the hub call is `load_dataset`, the others `from_parquet` /
`load_from_disk`, then the same column extraction). Errors name the file, the column and the row (1-based,
data rows: a CSV's header is not counted).
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.paths import PathKind
from app.schemas.job_spec import FileSource, HubSource, JobSpec, UploadedSource
from workers.distill.contract import EngineError, resolve_local_path

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class Table:
    """Columns of one split, equally long lists, plus where they came from (for messages and results)."""

    columns: dict[str, list[Any]]
    origin: str  # e.g. "train.csv", "val.parquet", "hub:imdb[test]"
    column_names: list[str]

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def _datasets_module() -> Any:
    try:
        return importlib.import_module("datasets")
    except ModuleNotFoundError as exc:
        raise EngineError(
            "unsupported",
            "Parquet, save_to_disk and hub datasets need the 'datasets' package (pip install datasets; the "
            "worker extra has it); or give the data as CSV/JSONL",
        ) from exc


def _from_hf(table: Any, columns: Sequence[str] | None, origin: str) -> Table:
    names = list(table.column_names)
    wanted = list(columns) if columns is not None else names
    absent = [c for c in wanted if c not in names]
    if absent:
        raise EngineError("dataset_invalid", f"{origin} lacks column(s) {', '.join(absent)}; has {names}")
    return Table(columns={c: list(table[c]) for c in wanted}, origin=origin, column_names=names)


def _read_text_file(path: Path, columns: Sequence[str] | None) -> Table:
    suffix = path.suffix.lower()
    rows: list[Any]
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix in (".jsonl", ".ndjson", ".json"):
                rows = []
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise EngineError(
                                "dataset_invalid", f"{path.name} line {number} is not JSON: {exc}"
                            ) from exc
            else:
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError as exc:
        raise EngineError("dataset_invalid", f"{path.name} is not UTF-8 text: {exc}") from exc
    except (OSError, csv.Error) as exc:
        raise EngineError("dataset_invalid", f"cannot read {path.name}: {exc}") from exc
    if not rows:
        raise EngineError("dataset_invalid", f"{path.name} has no rows")
    names = list(rows[0]) if isinstance(rows[0], dict) else []
    wanted = list(columns) if columns is not None else names
    out: dict[str, list[Any]] = {c: [] for c in wanted}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise EngineError("dataset_invalid", f"{path.name} row {number} is not an object")
        absent = [c for c in wanted if c not in row or row[c] is None]
        if absent:
            raise EngineError(
                "dataset_invalid", f"{path.name} row {number} lacks column(s) {', '.join(absent)}"
            )
        for c in wanted:
            out[c].append(row[c])
    return Table(columns=out, origin=path.name, column_names=names)


def read_path(path: Path, columns: Sequence[str] | None, *, role: str = "train") -> Table:
    """A file or `save_to_disk` directory as columns (`columns` None: all of them).

    A `save_to_disk` DatasetDict gives its split named `role` ('train' | 'validation' | 'test').
    """
    if path.is_dir():
        datasets = _datasets_module()
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise EngineError(
                "dataset_invalid", f"{path.name} is not a directory written by save_to_disk: {exc}"
            ) from exc
        if isinstance(loaded, datasets.DatasetDict):
            if role not in loaded:
                raise EngineError(
                    "dataset_invalid",
                    f"{path.name} is a DatasetDict without a '{role}' split; has {sorted(loaded)}",
                )
            return _from_hf(loaded[role], columns, f"{path.name}[{role}]")
        return _from_hf(loaded, columns, path.name)
    if not path.is_file():
        raise EngineError("dataset_invalid", f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        datasets = _datasets_module()
        try:
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as exc:  # pyarrow raises its own error types for a damaged file; all are reported
            raise EngineError(
                "dataset_invalid", f"{path.name} is not a readable Parquet file: {exc}"
            ) from exc
        return _from_hf(table, columns, path.name)
    if suffix in TEXT_SUFFIXES:
        return _read_text_file(path, columns)
    raise EngineError(
        "dataset_invalid",
        f"{path.name}: expected .csv, .tsv, .jsonl, .parquet or a save_to_disk directory",
    )


def read_hub(source: HubSource, columns: Sequence[str] | None) -> Table:
    """A hub dataset through `datasets.load_dataset(name, subset, split=..., revision=...)`."""
    datasets = _datasets_module()
    try:
        table = datasets.load_dataset(
            source.name, source.subset, split=source.split, revision=source.revision
        )
    except Exception as exc:  # the hub raises many types (network, missing split, auth); all are reported
        raise EngineError(
            "dataset_invalid", f"hub dataset '{source.name}' could not be loaded: {exc}"
        ) from exc
    return _from_hf(table, columns, f"hub:{source.name}[{source.split}]")


def read_source(
    source: FileSource | HubSource | UploadedSource,
    columns: Sequence[str] | None,
    *,
    file_root: Path | None,
    role: str = "train",
) -> Table:
    """Any dataset source as columns; an 'uploaded' one must have been resolved to a file by the caller."""
    if isinstance(source, HubSource):
        return read_hub(source, columns)
    if isinstance(source, FileSource):
        path = resolve_local_path(
            source.path, file_root, kind=PathKind.any, what="dataset path", missing_code="dataset_invalid"
        )
        return read_path(path, columns, role=role)
    raise EngineError(
        "dataset_unresolved", "an 'uploaded' dataset must be resolved to a file by the service first"
    )


def held_out_sources(
    spec: JobSpec,
) -> tuple[FileSource | HubSource | UploadedSource | None, FileSource | HubSource | UploadedSource | None]:
    """The client's validation and test sources (None: carve that split from the data)."""
    return spec.dataset_config.validation, spec.dataset_config.test


def split_report(
    train: tuple[str, int], validation: tuple[str, int, bool], test: tuple[str, int, bool]
) -> dict[str, dict[str, Any]]:
    """results.splits: where each split came from, its rows, and whether it was given or carved."""
    return {
        "train": {"source": train[0], "rows": train[1]},
        "validation": {"source": validation[0], "rows": validation[1], "given": validation[2]},
        "test": {"source": test[0], "rows": test[1], "given": test[2]},
    }
