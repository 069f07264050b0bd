"""`torch.export` programs (`.pt2`) as teachers: any PyTorch model whose output is logits.

The program is loaded with `torch.export.load` (never unpickled as a module). Its one tensor input's shape
and dtype are read from the program and checked against the data: the data's flat features (B, F) are
reshaped to the program's input shape (B, *dims) with prod(dims) == F and cast to its floating dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.distill.contract import EngineError

PROGRAM_SUFFIXES = (".pt2",)


@dataclass(frozen=True)
class ProgramSignature:
    """What the engine needs from a program: input dims after the batch, input dtype, output classes."""

    input_dims: tuple[int, ...]  # (F,) | (C, H, W) | ...
    input_dtype: torch.dtype
    num_classes: int

    @property
    def in_features(self) -> int:
        return math.prod(self.input_dims)


class ProgramTeacher(nn.Module):
    """A loaded `.pt2` program behind the classification interface: (B, F) float features -> (B, C) logits."""

    def __init__(self, program: Any, signature: ProgramSignature, location: str) -> None:
        super().__init__()
        self.program = program.module()  # the program's graph as a module (parameters, no Python code)
        self.signature = signature
        self.location = location
        self.config = {
            "in_features": signature.in_features,
            "num_classes": signature.num_classes,
            "input_dims": list(signature.input_dims),
            "input_dtype": str(signature.input_dtype).removeprefix("torch."),
        }

    def train(self, mode: bool = True) -> ProgramTeacher:
        # An exported module refuses train()/eval(); a teacher is always in inference mode anyway.
        self.training = mode
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        shaped = inputs.reshape(inputs.shape[0], *self.signature.input_dims)  # (B, F) -> (B, *dims)
        logits = self.program(shaped.to(self.signature.input_dtype))
        return logits.float()  # (B, C)


def _signature(program: Any, location: str) -> ProgramSignature:
    """The input dims/dtype of the program's single tensor input, and its output width (via a probe)."""
    placeholders = [
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in set(program.graph_signature.user_inputs)
    ]
    if len(placeholders) != 1:
        raise EngineError(
            "teacher_invalid",
            f"teacher program {location} takes {len(placeholders)} inputs; a teacher takes one tensor "
            "(the features, or an image) and returns logits",
        )
    value = placeholders[0].meta.get("val")
    if value is None or not hasattr(value, "shape"):
        raise EngineError("teacher_invalid", f"teacher program {location}: its input is not a tensor")
    shape = list(value.shape)
    if len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        raise EngineError(
            "teacher_invalid",
            f"teacher program {location} takes input of shape {shape}; expected (batch, ...) with fixed "
            "sizes after the batch dimension",
        )
    dtype = value.dtype
    if not dtype.is_floating_point:
        raise EngineError(
            "teacher_invalid",
            f"teacher program {location} takes {dtype} input; numeric/image distillation needs a floating "
            "point input",
        )
    dims = tuple(int(d) for d in shape[1:])
    module = program.module()
    batch = 2 if not isinstance(shape[0], int) else int(shape[0])
    with torch.no_grad():
        output = module(torch.zeros(batch, *dims, dtype=dtype))
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        described = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise EngineError(
            "teacher_invalid",
            f"teacher program {location} returns {described}; a teacher returns logits (batch, classes)",
        )
    return ProgramSignature(input_dims=dims, input_dtype=dtype, num_classes=int(output.shape[1]))


def load_program_teacher(path: Path, device: torch.device) -> ProgramTeacher:
    """Load a `.pt2` teacher (torch.export.load) and read its signature; frozen, on `device`."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a damaged or foreign archive raises many types; all mean "not loadable"
        raise EngineError(
            "teacher_not_found", f"{path.name} is not a torch.export program (torch.export.save): {exc}"
        ) from exc
    signature = _signature(program, path.name)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    teacher = ProgramTeacher(program, signature, str(path))
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher
