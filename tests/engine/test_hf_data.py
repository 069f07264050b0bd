"""Text data and teacher sources for transformer jobs: files, labels, splits, masking, paths, hub ids."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch

from app.schemas.job_spec import JobSpec, Task
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import (
    classification_rows,
    make_bert_tokenizer,
    save_tiny_bert,
    save_tiny_gpt2,
    write_jsonl,
)
from workers.distill.contract import EngineError
from workers.distill.kernel import IGNORE_INDEX
from workers.distill.tasks.transformers.data import (
    causal_targets,
    mask_tokens,
    read_text_splits,
    tokenise_split,
)
from workers.distill.tasks.transformers.models import load_hf_teacher


def _spec(path: str, task: str = "sequence-classification", **dataset: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"teacher_model_name": "t", "task": task, "dataset_config": {"kind": "file", "path": path, **dataset}}
    )


def test_csv_and_jsonl_give_the_same_deterministic_stratified_splits(tmp_path: Path) -> None:
    rows = classification_rows(100, seed=3)
    write_jsonl(tmp_path / "d.jsonl", rows)
    lines = ["text,label", *(f'"{r["text"]}",{r["label"]}' for r in rows)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    a = read_text_splits(_spec("d.jsonl"), file_root=tmp_path)
    b = read_text_splits(_spec("d.csv"), file_root=tmp_path)
    again = read_text_splits(_spec("d.jsonl"), file_root=tmp_path)
    assert a.train == b.train == again.train and a.test == b.test and a.fingerprint == b.fingerprint
    assert (len(a.train.texts), len(a.val.texts), len(a.test.texts)) == (80, 10, 10)
    assert sorted(a.train.texts + a.val.texts + a.test.texts) == sorted(str(r["text"]) for r in rows)
    assert a.num_labels == 3 and set(a.test.labels or []) == {0, 1, 2}  # stratified: every class in test


def test_named_labels_are_mapped_and_bad_labels_rejected(tmp_path: Path) -> None:
    rows = [{"review": f"text number {i}", "y": ["neg", "pos"][i % 2]} for i in range(20)]
    write_jsonl(tmp_path / "named.jsonl", rows)
    splits = read_text_splits(
        _spec("named.jsonl", text_column="review", label_column="y"), file_root=tmp_path
    )
    assert splits.label_names == ["neg", "pos"] and splits.num_labels == 2

    write_jsonl(tmp_path / "gap.jsonl", [{"text": f"t {i}", "label": [0, 2][i % 2]} for i in range(20)])
    with pytest.raises(EngineError, match=r"never seen: \[1\]"):
        read_text_splits(_spec("gap.jsonl"), file_root=tmp_path)
    write_jsonl(tmp_path / "nolabel.jsonl", [{"text": f"t {i}"} for i in range(20)])
    with pytest.raises(EngineError, match="row 1 lacks column"):
        read_text_splits(_spec("nolabel.jsonl"), file_root=tmp_path)
    write_jsonl(tmp_path / "few.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(EngineError, match="at least 10"):
        read_text_splits(_spec("few.jsonl"), file_root=tmp_path)
    # Language modelling needs no label column.
    splits = read_text_splits(_spec("nolabel.jsonl", task="causal-lm"), file_root=tmp_path)
    assert splits.num_labels is None and splits.train.labels is None


def test_paths_outside_the_allowed_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_jsonl(tmp_path / "outside.jsonl", classification_rows(20))
    (root / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    for path in ("../outside.jsonl", str(tmp_path / "outside.jsonl"), "link.jsonl"):
        with pytest.raises(EngineError) as info:
            read_text_splits(_spec(path), file_root=root)
        assert info.value.code == "path_outside_root"
    teacher = TeacherSource(
        name="t", kind=TeacherSourceKind.local, location="../elsewhere", type="transformer"
    )
    with pytest.raises(EngineError, match="outside the allowed root"):
        load_hf_teacher(teacher, Task.causal_lm, num_labels=None, file_root=root)


def test_hub_dataset_without_the_datasets_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if the package were absent
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": "causal-lm",
            "dataset_config": {"kind": "hub", "name": "wikitext"},
        }
    )
    with pytest.raises(EngineError, match="pip install datasets"):
        read_text_splits(spec, file_root=None)


def test_language_model_teacher_without_its_head_is_refused(tmp_path: Path) -> None:
    save_tiny_bert(tmp_path / "base", head="none", layers=1, hidden=16, heads=2)
    source = TeacherSource(name="base", kind=TeacherSourceKind.local, location="base", type="transformer")
    with pytest.raises(EngineError, match="no trained masked-lm head") as info:
        load_hf_teacher(source, Task.masked_lm, num_labels=None, file_root=tmp_path)
    assert info.value.code == "teacher_invalid"
    missing_config = source.model_copy(update={"location": "nowhere"})
    with pytest.raises(EngineError, match=r"No file or directory at 'nowhere'") as info:
        load_hf_teacher(missing_config, Task.masked_lm, num_labels=None, file_root=tmp_path)
    assert info.value.code == "teacher_not_found"


def test_masking_is_deterministic_and_skips_special_tokens() -> None:
    tokenizer = make_bert_tokenizer()
    encoded = tokenizer(["the film was very good and great"] * 40, return_tensors="pt")
    ids, attention = encoded["input_ids"], encoded["attention_mask"]
    masked, labels = mask_tokens(ids, attention, tokenizer, seed=5)
    again, labels_again = mask_tokens(ids, attention, tokenizer, seed=5)
    assert torch.equal(masked, again) and torch.equal(labels, labels_again)
    chosen = labels != IGNORE_INDEX
    assert chosen.any(dim=1).all()  # every example has a target
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] / [SEP] never masked
    assert 0.08 < float(chosen.float().mean()) < 0.3
    assert torch.equal(labels[chosen], ids[chosen])
    assert (masked[chosen] == tokenizer.mask_token_id).float().mean() > 0.6


def test_causal_targets_are_next_tokens_with_padding_ignored() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert causal_targets(ids, mask).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]


def test_tokenised_split_is_padded_to_its_longest_example(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", classification_rows(30))
    splits = read_text_splits(_spec("d.jsonl"), file_root=tmp_path)
    dataset = tokenise_split(
        splits.train, make_bert_tokenizer(), Task.sequence_classification, max_length=12, seed=0
    )
    assert dataset.tensors["input_ids"].shape == (len(splits.train.texts), 12)  # truncated to max_seq_length
    assert dataset.tensors["labels"].tolist() == splits.train.labels


def test_hub_teacher_loads_through_from_pretrained_from_a_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub code path (a repo id, from_pretrained) with a tiny model placed in an offline hub cache."""
    save_tiny_gpt2(tmp_path / "model", layers=2, hidden=16, heads=2)
    repo = tmp_path / "cache" / "models--tiny-org--gpt2-mini"
    shutil.copytree(tmp_path / "model", repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = TeacherSource(
        name="gpt2-mini", kind=TeacherSourceKind.hub, location="tiny-org/gpt2-mini", type="causal_lm"
    )
    loaded = load_hf_teacher(source, Task.causal_lm, num_labels=None, file_root=None)
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and not loaded.needs_finetune
    assert loaded.tokenizer.pad_token is not None
    absent = source.model_copy(update={"location": "tiny-org/absent"})
    with pytest.raises(EngineError) as info:
        load_hf_teacher(absent, Task.causal_lm, num_labels=None, file_root=None)
    assert info.value.code == "teacher_not_found" and "tiny-org/absent" in info.value.message
    assert json.loads((repo / "snapshots" / ("a" * 40) / "config.json").read_text())["model_type"] == "gpt2"
