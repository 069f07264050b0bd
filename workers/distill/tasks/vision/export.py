"""Artifacts of an image student: a `torch.export` program and ONNX, both with a dynamic batch dimension."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workers.distill.contract import EngineError
from workers.distill.tasks.transformers.onnx_export import ONNX_OPSET, ONNX_TOLERANCE, run_onnx

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
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (pixels,),
                str(path),
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_shapes=_dynamic_batch(),
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except (RuntimeError, ValueError, TypeError, ImportError) as exc:
        raise EngineError("export_failed", f"ONNX export failed: {exc}") from exc
    with torch.no_grad():
        expected = wrapper(pixels).float().numpy()  # (B, K)
    difference = float(np.abs(run_onnx(path, {"pixel_values": pixels}) - expected).max())
    if not difference <= ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise EngineError("export_failed", f"ONNX logits differ from PyTorch by {difference:.3g}")
    return difference
