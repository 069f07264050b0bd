"""The engine's kernel: batches, model outputs, task data, parameter counting, device moves. Imports no task.

Every other module speaks these types: datasets yield `Batch` items (`dict[str, Tensor]`) in a
deterministic order, so a teacher's outputs can be cached per example index; a `TensorDictDataset` (all items
stacked in tensors) lets the loop index whole batches at once; a forward pass gives `ModelOutputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]
Collate = Callable[[list[Batch]], Batch]


@dataclass
class ModelOutputs:
    """What a forward pass gives the losses."""

    logits: torch.Tensor  # (B, C) classification | (B, T, V) token tasks
    hidden_states: Sequence[torch.Tensor] | None = None  # per layer: (B, H) or (B, T, H)
    attentions: Sequence[torch.Tensor] | None = None  # per layer: (B, heads, T, T)
    # Adapter-specific extras, e.g. {"topk_indices": (B, T, k)} for a top-k teacher cache.
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class TensorDictDataset(Dataset[Batch]):
    """Items are rows of equally long tensors; lets the loop index whole batches at once."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors differ in length: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> Batch:
        return {name: t[index] for name, t in self.tensors.items()}

    def get_batch(self, indices: torch.Tensor) -> Batch:
        """Rows `indices` of every tensor: (B, ...) each."""
        return {name: t[indices] for name, t in self.tensors.items()}


@dataclass
class TaskData:
    """The three splits of a job's data plus what the adapter needs to interpret them."""

    train: Dataset[Batch]
    val: Dataset[Batch]
    test: Dataset[Batch]
    collate: Collate | None  # None: items are stacked with torch.stack per key
    num_labels: int | None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"tokenizer": ...}


def default_collate(items: list[Batch]) -> Batch:
    """Stack same-shaped items key by key: (B, ...)."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def make_batch(dataset: Dataset[Batch], indices: torch.Tensor, collate: Collate | None) -> Batch:
    """One batch of `indices` from `dataset` (fast path for `TensorDictDataset`)."""
    if isinstance(dataset, TensorDictDataset):
        return dataset.get_batch(indices)
    return (collate or default_collate)([dataset[int(i)] for i in indices])


def iterate_batches(
    dataset: Dataset[Batch],
    batch_size: int,
    collate: Collate | None,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, Batch]]:
    """Yield (indices, batch); shuffled with `generator` when given, else in dataset order."""
    size = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(size, generator=generator) if generator is not None else torch.arange(size)
    for start in range(0, size, batch_size):
        indices = order[start : start + batch_size]
        yield indices, make_batch(dataset, indices, collate)


def to_device(batch: Batch, device: torch.device, *, non_blocking: bool = False) -> Batch:
    """Move every tensor of a batch to `device`."""
    return {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_size_mb(model: nn.Module) -> float:
    """Bytes of parameters and buffers / 2**20."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)
