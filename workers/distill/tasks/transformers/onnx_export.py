"""ONNX export of a sequence-classification student, checked against the PyTorch logits."""

from __future__ import annotations

import copy
import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.distill.contract import EngineError

ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits of a transformers model: the plain-tensor interface that
    `torch.export` (student.pt2) and ONNX need."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """Logits from the ONNX file: onnxruntime when installed, else onnx's reference evaluator (slow)."""
    feeds = {name: tensor.cpu().numpy() for name, tensor in inputs.items()}
    try:
        ort = importlib.import_module("onnxruntime")
    except ModuleNotFoundError:
        from onnx.reference import ReferenceEvaluator

        outputs: Any = ReferenceEvaluator(str(path)).run(None, feeds)
        return np.asarray(outputs[0])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def export_onnx(model: nn.Module, path: Path, example: dict[str, torch.Tensor]) -> float:
    """Write `path` (dynamic batch and sequence axes) and return max |onnx - torch| on `example`.

    Raises EngineError('export_failed') when the exporter fails or the outputs differ beyond tolerance.
    """
    wrapper = LogitsOnly(copy.deepcopy(model)).cpu().eval()  # a CPU copy; `model` stays where it is
    inputs = {"input_ids": example["input_ids"].cpu(), "attention_mask": example["attention_mask"].cpu()}
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=8192)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return export_checked_onnx(wrapper, inputs, path, dynamic_shapes=dynamic)


def export_checked_onnx(
    wrapper: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    dynamic_shapes: dict[str, dict[int, Any]],
) -> float:
    """`torch.onnx.export` of `wrapper` (CPU, eval; named tensor inputs -> `logits`), then max |onnx - torch|
    on `inputs`. Shared by every task that ships ONNX.

    Raises EngineError('export_failed') when the exporter fails or the outputs differ beyond tolerance.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                tuple(inputs.values()),
                str(path),
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except (RuntimeError, ValueError, TypeError, ImportError) as exc:
        raise EngineError("export_failed", f"ONNX export failed: {exc}") from exc
    with torch.no_grad():
        expected = wrapper(*inputs.values()).float().numpy()  # (B, C)
    difference = float(np.abs(run_onnx(path, inputs) - expected).max())
    if not difference <= ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise EngineError("export_failed", f"ONNX logits differ from PyTorch by {difference:.3g}")
    return difference
