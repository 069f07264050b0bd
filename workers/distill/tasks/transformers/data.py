"""Text data for transformer jobs: read CSV/JSONL or hub datasets, split deterministically, tokenise."""

from __future__ import annotations

import hashlib
import json
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


# Roles a chat row's messages may have; the loss is on "assistant" messages only.
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class TextRecords:
    """Raw examples of one split: texts, and integer labels for classification.

    Chat / instruction data (causal-lm) also keeps its structure: `messages` (one conversation per example,
    rendered with the tokenizer's chat template) or `pairs` (prompt, completion); `texts` then holds a plain
    rendering for display and fingerprints.
    """

    texts: list[str]
    labels: list[int] | None
    messages: list[list[dict[str, str]]] | None = None
    pairs: list[tuple[str, str]] | None = None


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


def _chat_format(column_names: list[str], text_column: str) -> str:
    """'messages', 'prompt_completion' or 'text': the layout of a split's columns."""
    if text_column in column_names:
        return "text"
    if "messages" in column_names:
        return "messages"
    if "prompt" in column_names and "completion" in column_names:
        return "prompt_completion"
    return "text"


def _validated_messages(row: dict[str, Any], number: int) -> list[dict[str, str]]:
    """A row's `messages` as [{role, content}], with at least one assistant message."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EngineError("dataset_invalid", f"row {number}: 'messages' must be a non-empty list")
    cleaned: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise EngineError(
                "dataset_invalid", f"row {number} message {index}: needs 'role' and a string 'content'"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise EngineError(
                "dataset_invalid",
                f"row {number} message {index}: role {role!r} is not one of {', '.join(CHAT_ROLES)}",
            )
        cleaned.append({"role": str(role), "content": message["content"]})
    if not any(m["role"] == "assistant" for m in cleaned):
        raise EngineError("dataset_invalid", f"row {number}: no assistant message (nothing to learn)")
    return cleaned


def _chat_records(rows: list[dict[str, Any]], layout: str) -> TextRecords:
    """Chat or prompt/completion rows as TextRecords (texts: a plain rendering for fingerprints)."""
    if layout == "messages":
        conversations = [_validated_messages(row, n) for n, row in enumerate(rows, start=1)]
        texts = [json.dumps(c, sort_keys=True) for c in conversations]
        return TextRecords(texts=texts, labels=None, messages=conversations)
    pairs: list[tuple[str, str]] = []
    for number, row in enumerate(rows, start=1):
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise EngineError(
                "dataset_invalid", f"row {number}: 'prompt' and a non-empty 'completion' must be strings"
            )
        pairs.append((prompt, completion))
    return TextRecords(texts=[json.dumps([p, c]) for p, c in pairs], labels=None, pairs=pairs)


def _subset(records: TextRecords, indices: list[int]) -> TextRecords:
    return TextRecords(
        texts=[records.texts[i] for i in indices],
        labels=[records.labels[i] for i in indices] if records.labels else None,
        messages=[records.messages[i] for i in indices] if records.messages else None,
        pairs=[records.pairs[i] for i in indices] if records.pairs else None,
    )


@dataclass
class _RawSplit:
    texts: list[str]
    raw_labels: list[Any] | None
    origin: str
    chat: TextRecords | None = None  # chat / prompt-completion rows (causal-lm)


def _read_split(
    source: FileSource | HubSource | UploadedSource,
    classify: bool,
    *,
    file_root: Path | None,
    role: str,
    chat_allowed: bool = False,
) -> _RawSplit:
    """One source's non-empty texts (and raw labels); with `chat_allowed`, chat or prompt/completion rows."""
    text_column = source.text_column  # type: ignore[union-attr]
    if chat_allowed:
        table = read_source(source, None, file_root=file_root, role=role)
        layout = _chat_format(table.column_names, text_column)
        if layout != "text":
            names = list(table.columns)
            rows = [
                dict(zip(names, values, strict=True)) for values in zip(*table.columns.values(), strict=True)
            ]
            try:
                chat = _chat_records(rows, layout)
            except EngineError as exc:
                raise EngineError(exc.code, f"{table.origin} {exc.message}") from exc
            return _RawSplit(chat.texts, None, table.origin, chat)
    columns = [text_column, *([source.label_column] if classify else [])]  # type: ignore[union-attr]
    table = read_source(source, columns, file_root=file_root, role=role)
    texts = [str(value) for value in table.columns[columns[0]]]
    keep = [i for i, text in enumerate(texts) if text.strip()]
    raw = [table.columns[columns[1]][i] for i in keep] if classify else None
    return _RawSplit([texts[i] for i in keep], raw, table.origin)


def read_text_splits(spec: JobSpec, *, file_root: Path | None) -> TextSplits:
    """Read the job's texts (and labels), validate them, and split them deterministically.

    Without `dataset_config.validation`/`test` the data are split 80/10/10 (stratified by label); a given
    split is used as it is and the others are carved from the data (test 10%, validation 1/9 of the rest).
    causal-lm sources may instead hold chat rows (`messages`: [{role, content}]) or instruction rows
    (`prompt`, `completion`); the loss is then only on assistant / completion tokens.
    """
    config = spec.dataset_config
    classify = spec.task == Task.sequence_classification
    if not isinstance(config, FileDataset | HubDataset):
        raise EngineError(
            "dataset_unresolved",
            f"task '{spec.task}' needs a 'file' or 'hub' dataset "
            "(an 'uploaded' one is resolved by the service)",
        )
    chat = spec.task == Task.causal_lm
    main = _read_split(config, classify, file_root=file_root, role="train", chat_allowed=chat)
    given_val = (
        _read_split(config.validation, classify, file_root=file_root, role="validation", chat_allowed=chat)
        if config.validation is not None
        else None
    )
    given_test = (
        _read_split(config.test, classify, file_root=file_root, role="test", chat_allowed=chat)
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
        if main.chat is not None:
            return _subset(main.chat, ordered)
        return TextRecords(
            [main.texts[i] for i in ordered], [main_labels[i] for i in ordered] if main_labels else None
        )

    def given_records(part: _RawSplit) -> TextRecords:
        if part.chat is not None:
            return part.chat
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


def _segments(records: TextRecords, tokenizer: PreTrainedTokenizerBase) -> list[list[tuple[str, bool]]]:
    """Each example as text segments (text, is_target): the assistant / completion parts are targets.

    A conversation is rendered with the tokenizer's chat template incrementally: the text each assistant
    message adds after the template's generation prompt is a target segment, the rest context.
    """
    if records.pairs is not None:
        eos = tokenizer.eos_token or ""
        return [[(prompt, False), (completion + eos, True)] for prompt, completion in records.pairs]
    assert records.messages is not None
    if not getattr(tokenizer, "chat_template", None):
        raise EngineError(
            "tokenizer_invalid",
            "the dataset has chat rows ('messages') but the teacher's tokenizer has no chat template "
            "(tokenizer_config.json 'chat_template'); add one, or give prompt/completion rows instead",
        )
    examples: list[list[tuple[str, bool]]] = []
    for number, conversation in enumerate(records.messages, start=1):
        segments: list[tuple[str, bool]] = []
        rendered = ""
        for index, message in enumerate(conversation):
            if message["role"] == "assistant":
                prompt = _render(tokenizer, conversation[:index], generation_prompt=True)
                if not prompt.startswith(rendered):
                    raise EngineError(
                        "tokenizer_invalid",
                        f"chat row {number}: the chat template does not render conversations "
                        "incrementally (a prefix renders differently); cannot find the assistant tokens",
                    )
                segments.append((prompt[len(rendered) :], False))
                rendered = prompt
            full = _render(tokenizer, conversation[: index + 1], generation_prompt=False)
            if not full.startswith(rendered):
                raise EngineError(
                    "tokenizer_invalid",
                    f"chat row {number}: the chat template does not render conversations incrementally",
                )
            segments.append((full[len(rendered) :], message["role"] == "assistant"))
            rendered = full
        examples.append([(text, target) for text, target in segments if text])
    return examples


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    if not messages:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def encode_segments(
    examples: list[list[tuple[str, bool]]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and loss_mask (N, T), right-padded; loss_mask = 1 on target tokens.

    Each segment is tokenised on its own (no special tokens added) and the pieces concatenated, so a
    token belongs to exactly one segment; sequences are truncated to max_length.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EngineError("tokenizer_invalid", "the tokenizer has neither a pad nor an eos token")
    rows: list[tuple[list[int], list[int]]] = []
    for segments in examples:
        ids: list[int] = []
        targets: list[int] = []
        for text, is_target in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            targets += [int(is_target)] * len(piece)
        rows.append((ids[:max_length], targets[:max_length]))
    length = max(1, max(len(ids) for ids, _ in rows))
    input_ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(targets, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def tokenise_split(
    records: TextRecords,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    max_length: int,
    seed: int,
) -> TensorDictDataset:
    """A split as stacked tensors (fast batching, cacheable by index)."""
    if records.messages is not None or records.pairs is not None:
        tensors = encode_segments(_segments(records, tokenizer), tokenizer, max_length)
        # A target token needs a token before it (the first position predicts nothing).
        if int(tensors["loss_mask"][:, 1:].sum()) == 0:
            raise EngineError(
                "dataset_invalid",
                f"no assistant/completion tokens within max_seq_length {max_length}; raise it",
            )
        return TensorDictDataset(tensors)
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


def causal_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token ids aligned with the logits: target[t] = input[t+1]; padding and the last step ignored.

    With `loss_mask` (B, T) (chat, instruction, generated tokens) only tokens it marks are targets.
    """
    targets = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    targets[:, :-1] = input_ids[:, 1:]
    keep = attention_mask[:, 1:] != 0
    if loss_mask is not None:
        keep = keep & (loss_mask[:, 1:] != 0)
    targets[:, :-1][~keep] = IGNORE_INDEX
    return targets
