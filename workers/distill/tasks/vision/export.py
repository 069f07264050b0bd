"""Artifacts of an image student: a `torch.export` program and ONNX, both with a dynamic batch dimension."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from workers.distill.tasks.transformers.onnx_export import export_checked_onnx

ONNX_FILE = "student.onnx"
MAX_BATCH = 4096


class PixelLogits(nn.Module):
    """pixel_values (B, C, H, W) -> logits (B, K) of a transformers image classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _dynamic_batch() -> dict[str, dict[int, torch.export.Dim]]:
    return {"pixel_values": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def export_program(wrapper: PixelLogits, path: Path, example: dict[str, torch.Tensor]) -> None:
    """`torch.export.save` of `wrapper` (CPU, eval) with a dynamic batch dimension."""
    pixels = example["pixel_values"].cpu()
    with torch.no_grad():
        program = torch.export.export(wrapper, (pixels,), dynamic_shapes=_dynamic_batch())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


def export_onnx(wrapper: PixelLogits, path: Path, example: dict[str, torch.Tensor]) -> float:
    """Write `path` (dynamic batch) and return max |onnx - torch| on `example`.

    Raises EngineError('export_failed') when the exporter fails or the outputs differ beyond tolerance.
    """
    pixels = example["pixel_values"].cpu()
    return export_checked_onnx(wrapper, {"pixel_values": pixels}, path, dynamic_shapes=_dynamic_batch())
