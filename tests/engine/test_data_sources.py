"""Data sources for every task: held-out text sets as Parquet / save_to_disk, one label mapping across
splits, and the hub loader as a thin wrapper over the same column code (its call checked, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
from datasets import Dataset, DatasetDict

from app.schemas.job_spec import HubSource, JobSpec
from tests.engine.tiny_models import classification_rows, write_jsonl
from workers.distill.contract import EngineError
from workers.distill.tables import read_hub, read_path
from workers.distill.tasks.transformers.data import read_text_splits

NAMES = ["neg", "neutral", "pos"]


def _named(rows: list[dict[str, object]]) -> dict[str, list[Any]]:
    return {"text": [r["text"] for r in rows], "label": [NAMES[int(r["label"])] for r in rows]}  # type: ignore[call-overload]


def _spec(**dataset: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": "sequence-classification",
            "dataset_config": {"kind": "file", "path": "train.jsonl", **dataset},
        }
    )


def test_text_validation_and_test_sets_from_parquet_and_save_to_disk(tmp_path: Path) -> None:
    train = classification_rows(90, seed=1)
    write_jsonl(
        tmp_path / "train.jsonl", [{"text": r["text"], "label": NAMES[int(r["label"])]} for r in train]
    )  # type: ignore[call-overload]
    Dataset.from_dict(_named(classification_rows(30, seed=2))).to_parquet(str(tmp_path / "val.parquet"))
    DatasetDict({"test": Dataset.from_dict(_named(classification_rows(40, seed=3)))}).save_to_disk(
        str(tmp_path / "held-out")
    )
    splits = read_text_splits(
        _spec(
            validation={"kind": "file", "path": "val.parquet"},
            test={"kind": "file", "path": "held-out"},
        ),
        file_root=tmp_path,
    )
    # Given splits are used whole; the training data is not carved.
    assert (len(splits.train.texts), len(splits.val.texts), len(splits.test.texts)) == (90, 30, 40)
    assert splits.label_names == NAMES and splits.num_labels == 3
    assert splits.report["validation"] == {"source": "val.parquet", "rows": 30, "given": True}
    assert splits.report["test"] == {"source": "held-out[test]", "rows": 40, "given": True}
    # Only a test set given: validation is carved (1/9) from the data, test is the given one.
    only_test = read_text_splits(_spec(test={"kind": "file", "path": "val.parquet"}), file_root=tmp_path)
    assert (len(only_test.train.texts), len(only_test.val.texts), len(only_test.test.texts)) == (80, 10, 30)
    assert only_test.report["validation"]["given"] is False and only_test.fingerprint != splits.fingerprint


def test_bad_sources_are_named(tmp_path: Path) -> None:
    DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(EngineError, match=r"without a 'validation' split; has \['train'\]"):
        read_path(tmp_path / "dd", None, role="validation")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(EngineError, match="not a readable Parquet file"):
        read_path(tmp_path / "broken.parquet", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="not a directory written by save_to_disk"):
        read_path(tmp_path / "empty", None)
    Dataset.from_dict({"words": ["a", "b"]}).to_parquet(str(tmp_path / "cols.parquet"))
    with pytest.raises(EngineError, match=r"lacks column\(s\) text; has \['words'\]"):
        read_path(tmp_path / "cols.parquet", ["text"])


def test_hub_dataset_is_load_dataset_with_name_subset_split_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, subset: str | None, *, split: str, revision: str | None) -> Dataset:
        calls.append((name, subset, split, revision))
        return Dataset.from_dict({"sentence": ["x", "y"], "label": [0, 1], "idx": [0, 1]})

    # The hub itself is out of reach here; what is checked is the call and the shared column code.
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = HubSource(
        name="glue", subset="sst2", split="validation", revision="main", text_column="sentence"
    )
    table = read_hub(source, ["sentence", "label"])
    assert calls == [("glue", "sst2", "validation", "main")]
    assert (
        table.columns == {"sentence": ["x", "y"], "label": [0, 1]} and table.origin == "hub:glue[validation]"
    )
