"""Text data for transformer jobs: read CSV/JSONL or hub datasets, split deterministically, tokenise."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from transformers import PreTrainedTokenizerBase

from app.schemas.job_spec import FileDataset, FileSource, HubDataset, HubSource, JobSpec, Task, UploadedSource
from workers.distill.contract import EngineError
from workers.distill.kernel import IGNORE_INDEX, TensorDictDataset
from workers.distill.tables import read_source, split_report

MLM_PROBABILITY = 0.15
_MIN_PER_SPLIT = 1


@dataclass
class TextRecords:
    """Raw examples of one split: texts, and integer labels for classification."""

    texts: list[str]
    labels: list[int] | None


@dataclass
class TextSplits:
    """The three deterministic splits of a job's text data."""

    train: TextRecords
    val: TextRecords
    test: TextRecords
    num_labels: int | None
    label_names: list[str] | None
    fingerprint: str  # sha256 of the data, so a fine-tuned teacher can be reused for the same data
    report: dict[str, Any] = field(default_factory=dict)  # results.splits: each split's source and rows


def _labels_to_ints(raw: list[Any]) -> tuple[list[int], list[str] | None]:
    """Integer class ids 0..K-1; non-numeric labels are mapped in sorted order (names kept)."""
    try:
        numeric = [int(str(value).strip()) for value in raw]
    except ValueError:
        names = sorted({str(value) for value in raw})
        index = {name: i for i, name in enumerate(names)}
        return [index[str(value)] for value in raw], names
    if any(str(value).strip() != str(int(str(value).strip())) for value in raw):
        raise EngineError("dataset_invalid", "labels must be integers or class names")
    if min(numeric) < 0:
        raise EngineError("dataset_invalid", f"labels must be >= 0, found {min(numeric)}")
    missing = sorted(set(range(max(numeric) + 1)) - set(numeric))
    if missing:
        raise EngineError(
            "dataset_invalid", f"labels must cover 0..{max(numeric)}; never seen: {missing[:10]}"
        )
    return numeric, None


@dataclass
class _RawSplit:
    texts: list[str]
    raw_labels: list[Any] | None
    origin: str


def _read_split(
    source: FileSource | HubSource | UploadedSource, classify: bool, *, file_root: Path | None, role: str
) -> _RawSplit:
    """One source's non-empty texts (and raw labels)."""
    columns = [source.text_column, *([source.label_column] if classify else [])]  # type: ignore[union-attr]
    table = read_source(source, columns, file_root=file_root, role=role)
    texts = [str(value) for value in table.columns[columns[0]]]
    keep = [i for i, text in enumerate(texts) if text.strip()]
    raw = [table.columns[columns[1]][i] for i in keep] if classify else None
    return _RawSplit([texts[i] for i in keep], raw, table.origin)


def read_text_splits(spec: JobSpec, *, file_root: Path | None) -> TextSplits:
    """Read the job's texts (and labels), validate them, and split them deterministically.

    Without `dataset_config.validation`/`test` the data are split 80/10/10 (stratified by label); a given
    split is used as it is and the others are carved from the data (test 10%, validation 1/9 of the rest).
    """
    config = spec.dataset_config
    classify = spec.task == Task.sequence_classification
    if not isinstance(config, FileDataset | HubDataset):
        raise EngineError(
            "dataset_unresolved",
            f"task '{spec.task}' needs a 'file' or 'hub' dataset "
            "(an 'uploaded' one is resolved by the service)",
        )
    main = _read_split(config, classify, file_root=file_root, role="train")
    given_val = (
        _read_split(config.validation, classify, file_root=file_root, role="validation")
        if config.validation is not None
        else None
    )
    given_test = (
        _read_split(config.test, classify, file_root=file_root, role="test")
        if config.test is not None
        else None
    )
    if len(main.texts) < 10:
        raise EngineError("dataset_invalid", f"need at least 10 non-empty texts, found {len(main.texts)}")
    for given, role in ((given_val, "validation"), (given_test, "test")):
        if given is not None and not given.texts:
            raise EngineError("dataset_invalid", f"the {role} set {given.origin} has no non-empty texts")

    parts = [main, *(g for g in (given_val, given_test) if g is not None)]
    labels: list[int] | None = None
    names: list[str] | None = None
    split_labels: list[list[int]] = []
    if classify:
        # One label mapping over every split, so a class name means the same id everywhere.
        labels, names = _labels_to_ints([value for part in parts for value in part.raw_labels or []])
        offset = 0
        for part in parts:
            split_labels.append(labels[offset : offset + len(part.texts)])
            offset += len(part.texts)
        if len(set(split_labels[0])) < 2:
            raise EngineError("dataset_invalid", "classification needs at least 2 distinct labels")
    main_labels = split_labels[0] if classify else None

    digest = hashlib.sha256()
    for index, part in enumerate(parts):
        digest.update(f"\x02{index}".encode())
        for i, text in enumerate(part.texts):
            digest.update(text.encode())
            digest.update(b"\x00" + (str(split_labels[index][i]).encode() if classify else b"") + b"\x01")

    indices = np.arange(len(main.texts))
    try:
        if given_test is None:
            rest, test = train_test_split(indices, test_size=0.1, random_state=0, stratify=main_labels)
        else:
            rest, test = indices, np.arange(0)
        if given_val is None:
            rest_labels = [main_labels[i] for i in rest] if main_labels else None
            train, val = train_test_split(rest, test_size=1 / 9, random_state=0, stratify=rest_labels)
        else:
            train, val = rest, np.arange(0)
    except ValueError as exc:
        raise EngineError(
            "dataset_invalid",
            f"cannot split the data into train/val/test by label (too few per class?): {exc}",
        ) from exc

    def records(idx: np.ndarray) -> TextRecords:
        ordered = sorted(int(i) for i in idx)  # dataset order, independent of the split's shuffling
        return TextRecords(
            [main.texts[i] for i in ordered], [main_labels[i] for i in ordered] if main_labels else None
        )

    def given_records(part: _RawSplit) -> TextRecords:
        position = parts.index(part)
        return TextRecords(part.texts, split_labels[position] if classify else None)

    val_records = given_records(given_val) if given_val is not None else records(val)
    test_records = given_records(given_test) if given_test is not None else records(test)
    return TextSplits(
        train=records(train),
        val=val_records,
        test=test_records,
        num_labels=(max(labels) + 1) if labels else None,
        label_names=names,
        fingerprint=digest.hexdigest(),
        report=split_report(
            (main.origin, len(train)),
            (given_val.origin if given_val else main.origin, len(val_records.texts), given_val is not None),
            (
                given_test.origin if given_test else main.origin,
                len(test_records.texts),
                given_test is not None,
            ),
        ),
    )


def _encode(
    records: TextRecords, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (N, T), padded to the longest example (at most max_length)."""
    encoded = tokenizer(
        records.texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    return {
        "input_ids": encoded["input_ids"].long(),  # (N, T)
        "attention_mask": encoded["attention_mask"].long(),  # (N, T)
    }


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (15%: 80% [MASK], 10% random, 10% kept), fixed per example so teacher outputs cache.

    Returns (masked input_ids, mlm_labels) both (N, T); labels are IGNORE_INDEX except at chosen positions.
    """
    if tokenizer.mask_token_id is None:
        raise EngineError("teacher_invalid", "masked-lm needs a tokenizer with a mask token")
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(
        [
            tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
            for row in input_ids.tolist()
        ],
        dtype=torch.bool,
    )  # (N, T)
    eligible = (attention_mask == 1) & ~special
    chosen = (torch.rand(input_ids.shape, generator=generator) < MLM_PROBABILITY) & eligible
    # Every example with an eligible token gets at least one masked position.
    empty = ~chosen.any(dim=1) & eligible.any(dim=1)
    first = eligible.float().argmax(dim=1)
    chosen[empty.nonzero().squeeze(1), first[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


def tokenise_split(
    records: TextRecords,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    max_length: int,
    seed: int,
) -> TensorDictDataset:
    """A split as stacked tensors (fast batching, cacheable by index)."""
    tensors = _encode(records, tokenizer, max_length)
    if task == Task.sequence_classification:
        assert records.labels is not None
        tensors["labels"] = torch.tensor(records.labels, dtype=torch.long)  # (N,)
    elif task == Task.causal_lm:
        if int(tensors["attention_mask"].sum(dim=1).min()) < 2:
            short = int((tensors["attention_mask"].sum(dim=1) < 2).sum())
            raise EngineError(
                "dataset_invalid", f"{short} text(s) have fewer than 2 tokens; nothing to predict"
            )
    elif task == Task.masked_lm:
        masked, labels = mask_tokens(tensors["input_ids"], tensors["attention_mask"], tokenizer, seed=seed)
        tensors["input_ids"], tensors["mlm_labels"] = masked, labels
    return TensorDictDataset(tensors)


def causal_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token ids aligned with the logits: target[t] = input[t+1]; padding and the last step ignored."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    targets[:, :-1] = input_ids[:, 1:]
    targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return targets
