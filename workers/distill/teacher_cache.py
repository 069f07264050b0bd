"""The teacher cache: a frozen teacher's outputs over the train split, computed once, read per batch."""

from __future__ import annotations

import logging

import torch
from torch import nn

from app.schemas.job_spec import JobSpec
from workers.distill.adapter import TaskAdapter
from workers.distill.contract import EngineError, StopChecker
from workers.distill.kernel import ModelOutputs, TaskData, autocast, iterate_batches, to_device

logger = logging.getLogger(__name__)


class TeacherCacheStore:
    """Teacher outputs for every train example, computed once (teacher frozen, data deterministic).

    Tensors whose shape is the same for every batch are stacked (N, ...); tensors with a sequence dimension
    that varies between batches are kept per example and fitted (padded/truncated) to each batch's length;
    the positions this adds or removes are padding, which the losses ignore.
    """

    def __init__(self, stacked: dict[str, torch.Tensor | list[torch.Tensor]], layout: dict[str, int]) -> None:
        self.entries = stacked
        self.layout = layout  # number of hidden-state / attention layers: {"hidden": L, "attn": L}

    @staticmethod
    def build(
        teacher: nn.Module,
        adapter: TaskAdapter,
        data: TaskData,
        spec: JobSpec,
        *,
        device: torch.device,
        hidden_states: bool,
        attentions: bool,
        batch_size: int,
        max_bytes: int | None,
        stopper: StopChecker,
        temperature: float | None = None,
    ) -> TeacherCacheStore | None:
        """Run the teacher over the train split in order; None when the estimate exceeds `max_bytes`."""
        pieces: dict[str, list[torch.Tensor]] = {}
        layout: dict[str, int] = {}
        total = len(data.train)  # type: ignore[arg-type]
        with torch.inference_mode():
            for indices, cpu_batch in iterate_batches(data.train, batch_size, data.collate):
                batch = to_device(cpu_batch, device)
                with autocast(device):
                    outputs = adapter.forward(
                        teacher, batch, hidden_states=hidden_states, attentions=attentions
                    )
                outputs = adapter.cache_teacher_outputs(outputs, spec, temperature=temperature)
                if not pieces and max_bytes is not None:
                    estimate = adapter.cache_bytes_per_example(outputs, indices.numel()) * total
                    if estimate > max_bytes:
                        logger.info(
                            "teacher cache needs ~%d bytes > %d: recomputing instead", estimate, max_bytes
                        )
                        return None
                flat = _flatten(outputs)
                layout = {"hidden": len(outputs.hidden_states or ()), "attn": len(outputs.attentions or ())}
                for key, tensor in flat.items():
                    pieces.setdefault(key, []).append(tensor.detach().clone())
                if stopper.due():
                    stopper.check("while caching teacher outputs")
        entries: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        for key, chunks in pieces.items():
            if all(c.shape[1:] == chunks[0].shape[1:] for c in chunks):
                entries[key] = torch.cat(chunks)  # (N, ...)
            else:
                entries[key] = [row for chunk in chunks for row in chunk]  # N x (T_i, ...)
        return TeacherCacheStore(entries, layout)

    def lookup(self, indices: torch.Tensor, like: ModelOutputs | None) -> ModelOutputs:
        """Teacher outputs for the examples `indices`; variable-length entries fitted to `like`'s lengths."""
        flat: dict[str, torch.Tensor] = {}
        for key, entry in self.entries.items():
            if isinstance(entry, torch.Tensor):
                flat[key] = entry[indices if indices.device == entry.device else indices.to(entry.device)]
            else:
                rows = [entry[int(i)] for i in indices]
                length = _sequence_length(like, rows[0].dim())
                assert like is not None  # _sequence_length refuses None
                # On the student's device (a cache read from disk may live elsewhere).
                flat[key] = torch.stack([_fit(row, length) for row in rows]).to(like.logits.device)
        return _unflatten(flat, self.layout)


def _sequence_length(like: ModelOutputs | None, row_dims: int) -> int:
    if like is None or like.logits.dim() < 3:
        raise EngineError("unsupported", "variable-length cached teacher outputs need (B, T, ...) logits")
    del row_dims
    return like.logits.shape[1]


def _fit(row: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (zeros) or truncate every leading sequence dim of `row` (T_i, ...) / (h, T_i, T_i) to `length`."""
    for dim in range(row.dim()):
        size = row.shape[dim]
        if dim == 0 or (row.dim() == 3 and dim in (1, 2) and row.shape[1] == row.shape[2]):
            if size > length:
                row = row.narrow(dim, 0, length)
            elif size < length:
                pad_shape = list(row.shape)
                pad_shape[dim] = length - size
                row = torch.cat([row, row.new_zeros(pad_shape)], dim=dim)
    return row


def _flatten(outputs: ModelOutputs) -> dict[str, torch.Tensor]:
    flat = {"logits": outputs.logits}
    for i, h in enumerate(outputs.hidden_states or ()):
        flat[f"hidden.{i}"] = h
    for i, a in enumerate(outputs.attentions or ()):
        flat[f"attn.{i}"] = a
    for key, value in outputs.extra.items():
        flat[f"extra.{key}"] = value
    return flat


def _unflatten(flat: dict[str, torch.Tensor], layout: dict[str, int]) -> ModelOutputs:
    hidden = [flat[f"hidden.{i}"] for i in range(layout["hidden"])] or None
    attn = [flat[f"attn.{i}"] for i in range(layout["attn"])] or None
    extra = {k.removeprefix("extra."): v for k, v in flat.items() if k.startswith("extra.")}
    return ModelOutputs(logits=flat["logits"], hidden_states=hidden, attentions=attn, extra=extra)
