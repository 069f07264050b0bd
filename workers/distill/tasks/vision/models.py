"""Vision teachers and students: transformers image classifiers and `torch.export` programs (`.pt2`).

- Teachers: a `save_pretrained` directory or hub id loaded with `AutoModelForImageClassification` (ViT,
  DeiT, ResNet, ConvNeXt, MobileNetV2, ...) with its `preprocessor_config.json`; or a `.pt2` program (a file,
  or a directory holding `model.pt2`): this is how torchvision / timm models come in, with the
  preprocessing given in the job.
- Derived students, same family at the target size: fewer blocks and narrower stages for stage CNNs
  (ResNet, ConvNeXt: `depths`, `hidden_sizes`), a smaller `depth_multiplier` for MobileNets, fewer and
  narrower layers for ViT-style encoders; the size that comes closest to target_compression is chosen by
  counting parameters on the meta device. Weights are copied from the teacher where shapes allow (leading
  slices of each tensor; ViT layers from uniformly spaced teacher layers). A `.pt2` teacher has no
  architecture to shrink: its derived student is a basic-block ResNet at the target size.
- Named students (hub / local / registry): any image classifier, with a fresh head for the teacher's label
  count when its own differs; 'config': the teacher's config with overrides (initialised from the teacher),
  or another family's fresh config when the overrides name a `model_type`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel

from app.core.paths import PathKind
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.contract import EngineError, resolve_local_path
from workers.distill.kernel import count_parameters
from workers.distill.losses import layer_mapping

PROGRAM_SUFFIX = ".pt2"
PROGRAM_FILE = "model.pt2"
PROCESSOR_FILE = "preprocessor_config.json"
_LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")
_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.09375, 0.0625)
_DEPTHS = (1.0, 0.75, 0.5, 0.34, 0.25, 0.0)  # 0.0: one block per stage / layer


class ProgramModule(nn.Module):
    """A loaded `torch.export` program as a frozen teacher: pixel_values (B, C, H, W) -> logits (B, K).

    The program's GraphModule refuses `.eval()`; it was exported in inference mode, so train/eval only
    flip this wrapper's flag.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ProgramModule:
        self.training = mode
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.program(pixel_values)
        if isinstance(output, dict):
            output = output.get("logits", next(iter(output.values())))
        if isinstance(output, tuple | list):
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise EngineError(
                "teacher_invalid", "the .pt2 program must return logits (B, num_labels) for pixel_values"
            )
        return output


@dataclass
class VisionTeacher:
    """A loaded teacher: the module, its family, and its image processor dict (None for programs)."""

    model: nn.Module
    family: str  # the transformers model_type, or "program"
    processor: dict[str, Any] | None
    location: str


def _attn_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """Only 'eager' is asked for (attention maps); otherwise each family keeps its default attention."""
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def is_program(model: nn.Module) -> bool:
    return isinstance(model, ProgramModule)


def _local(source: TeacherSource, file_root: Path | None) -> Path:
    return resolve_local_path(
        source.location, file_root, kind=PathKind.any, what="teacher", missing_code="teacher_not_found"
    )


def _program_path(source: TeacherSource, file_root: Path | None) -> Path | None:
    """The `.pt2` file a local source names (itself or `<dir>/model.pt2`), else None."""
    if source.kind != TeacherSourceKind.local:
        return None
    path = _local(source, file_root)
    if path.is_file() and path.suffix == PROGRAM_SUFFIX:
        return path
    if path.is_dir() and (path / PROGRAM_FILE).is_file() and not (path / "config.json").is_file():
        return path / PROGRAM_FILE
    return None


def _processor_dict(location: str) -> dict[str, Any] | None:
    """preprocessor_config.json of a directory or hub id (read as JSON: no image-processor class needed)."""
    directory = Path(location)
    if directory.is_dir():
        path = directory / PROCESSOR_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(location)
    except (OSError, ValueError):
        return None
    return dict(processor)


def load_vision_teacher(
    source: TeacherSource, *, file_root: Path | None, trust_remote_code: bool, attn_implementation: str | None
) -> VisionTeacher:
    """Load an image-classification teacher; EngineError('teacher_not_found') when it cannot be."""
    program = _program_path(source, file_root)
    if program is not None:
        try:
            loaded = torch.export.load(str(program))
        except Exception as exc:  # torch.export.load raises several types for foreign/corrupt files
            raise EngineError(
                "teacher_not_found",
                f"teacher '{source.name}': {program.name} is not a torch.export program: {exc}",
            ) from exc
        return VisionTeacher(
            model=ProgramModule(loaded.module()), family="program", processor=None, location=str(program)
        )
    if source.kind == TeacherSourceKind.local:
        directory = _local(source, file_root)
        if not (directory / "config.json").is_file():
            raise EngineError(
                "teacher_not_found",
                f"teacher '{source.name}': {directory} is neither a save_pretrained directory (config.json) "
                f"nor a torch.export program (.pt2 file, or a directory with {PROGRAM_FILE})",
            )
        location = str(directory)
    elif source.kind == TeacherSourceKind.hub:
        location = source.location
    else:
        raise EngineError(
            "unsupported", f"teacher '{source.name}' ({source.kind}) is not an image classifier"
        )
    try:
        model = AutoModelForImageClassification.from_pretrained(
            location,
            trust_remote_code=trust_remote_code,
            weights_only=True,
            **_attn_kwargs(attn_implementation),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(
            "teacher_not_found", f"teacher '{source.name}' could not be loaded from '{location}': {exc}"
        ) from exc
    return VisionTeacher(
        model=model.eval(),
        family=str(model.config.model_type),
        processor=_processor_dict(location),
        location=location,
    )


# ---- derived students ------------------------------------------------------------------------------


def _round8(value: float) -> int:
    """A channel count: a multiple of 8, or of 4 below 16 (tiny models), at least 4."""
    if value < 14:
        return max(4, round(value / 4) * 4)
    return round(value / 8) * 8


def _candidate_configs(config: PretrainedConfig) -> Iterable[tuple[PretrainedConfig, dict[str, Any]]]:
    """Smaller configs of the teacher's family, each with the fields it changes."""
    if hasattr(config, "depths") and hasattr(config, "hidden_sizes"):  # ResNet, ConvNeXt, RegNet-style
        depths, widths = list(config.depths), list(config.hidden_sizes)
        embedding = getattr(config, "embedding_size", None)
        for d in _DEPTHS:
            new_depths = [max(1, round(x * d)) for x in depths]
            for w in _WIDTHS:
                changes: dict[str, Any] = {
                    "depths": new_depths,
                    "hidden_sizes": [_round8(x * w) for x in widths],
                }
                if isinstance(embedding, int):
                    changes["embedding_size"] = _round8(embedding * w)
                yield _with(config, changes), changes
    elif hasattr(config, "depth_multiplier"):  # MobileNetV1/V2
        base = float(config.depth_multiplier)
        fine_options = [True, False] if getattr(config, "finegrained_output", None) is not None else [None]
        for fine in fine_options:
            for w in _WIDTHS:
                changes = {"depth_multiplier": round(base * w, 5)}
                if fine is not None:
                    changes["finegrained_output"] = fine and bool(config.finegrained_output)
                yield _with(config, changes), changes
    elif all(hasattr(config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")):
        layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        intermediate = getattr(config, "intermediate_size", 4 * hidden)
        for depth in range(layers, 0, -1):
            for new_heads in range(heads, 0, -1):
                new_hidden = new_heads * head_dim
                changes = {
                    "num_hidden_layers": depth,
                    "num_attention_heads": new_heads,
                    "hidden_size": new_hidden,
                    "intermediate_size": max(1, round(intermediate * new_hidden / hidden)),
                }
                yield _with(config, changes), changes
    else:
        raise EngineError(
            "unsupported",
            f"no derived student for '{config.model_type}' teachers yet; name a student (student kind "
            "'hub', 'local' or 'config' with a model_type)",
        )


def _with(config: PretrainedConfig, changes: dict[str, Any]) -> PretrainedConfig:
    updated = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(updated, key, value)
    return updated


def meta_parameters(config: PretrainedConfig) -> int:
    """Parameters of the image classifier `config` describes, counted without allocating weights."""
    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(config)
    return count_parameters(model)


def closest_config(
    candidates: Iterable[tuple[PretrainedConfig, dict[str, Any]]], target: float
) -> tuple[PretrainedConfig, dict[str, Any], int]:
    """The candidate whose parameter count is nearest `target` (in log scale; the first of equals)."""
    best: tuple[float, PretrainedConfig, dict[str, Any], int] | None = None
    for config, changes in candidates:
        params = meta_parameters(config)
        distance = abs(math.log(params / target))
        if best is None or distance < best[0] - 1e-9:
            best = (distance, config, changes, params)
    assert best is not None
    return best[1], best[2], best[3]


def program_student_config(num_labels: int, channels: int, target_params: float) -> PretrainedConfig:
    """A basic-block ResNet near `target_params` for a `.pt2` teacher (which has no config to shrink)."""
    base = AutoConfig.for_model(
        "resnet",
        num_channels=channels,
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        num_labels=num_labels,
    )
    candidates = []
    for stages in (4, 3, 2):  # fewer stages too: a small program may be far below a ResNet-18's size
        shallow = _with(base, {"hidden_sizes": base.hidden_sizes[:stages], "depths": base.depths[:stages]})
        candidates += list(_candidate_configs(shallow))
    config, _, _ = closest_config(candidates, target_params)
    return config


def _teacher_key(key: str, mapping: list[int] | None) -> str:
    """The teacher tensor a student tensor starts from: same name, ViT layer i -> teacher layer mapping[i]."""
    if mapping is None:
        return key
    return _LAYER_INDEX.sub(lambda m: f".layer.{mapping[int(m.group(1))]}.", key, count=1)


def copy_from_teacher(student: nn.Module, teacher: nn.Module, mapping: list[int] | None = None) -> int:
    """Copy each teacher tensor's leading slice into the student tensor of the same name; returns how many."""
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = 0
    with torch.no_grad():
        for key, target in student_state.items():
            source = teacher_state.get(_teacher_key(key, mapping))
            if source is None or source.dim() != target.dim():
                continue
            if any(s < t for s, t in zip(source.shape, target.shape, strict=True)):
                continue
            target.copy_(source[tuple(slice(0, n) for n in target.shape)])
            copied += 1
    student.load_state_dict(student_state)
    return copied


def _layer_mapping_for(student: PretrainedConfig, teacher: PretrainedConfig) -> list[int] | None:
    if hasattr(student, "num_hidden_layers") and hasattr(teacher, "num_hidden_layers"):
        return layer_mapping(int(student.num_hidden_layers), int(teacher.num_hidden_layers))
    return None


def student_from_config(
    config: PretrainedConfig, teacher: nn.Module | None, *, seed: int, attn_implementation: str | None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A fresh model of `config` (seeded), initialised from `teacher` where shapes allow; and its notes."""
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(config, **_attn_kwargs(attn_implementation))
    notes: dict[str, Any] = {"architecture": type(model).__name__, "initialised_from": "random"}
    if isinstance(teacher, PreTrainedModel) and teacher.config.model_type == config.model_type:
        copied = copy_from_teacher(model, teacher, _layer_mapping_for(config, teacher.config))
        total = len(model.state_dict())
        notes.update(
            initialised_from="teacher" if copied else "random", tensors_from_teacher=f"{copied}/{total}"
        )
    return model.eval(), notes


def derive_student(
    teacher: nn.Module,
    ratio: float,
    *,
    num_labels: int,
    channels: int,
    seed: int,
    attn_implementation: str | None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A same-family student at about `ratio` of the teacher's parameters (see the module docstring)."""
    teacher_params = count_parameters(teacher)
    target = max(1.0, ratio * teacher_params)
    if is_program(teacher):
        config = program_student_config(num_labels, channels, target)
        model, notes = student_from_config(config, None, seed=seed, attn_implementation=attn_implementation)
        notes = {**notes, "derived_for": ".pt2 teacher (basic-block ResNet)"}
    else:
        assert isinstance(teacher, PreTrainedModel)
        config, changes, _ = closest_config(_candidate_configs(teacher.config), target)
        model, notes = student_from_config(
            config, teacher, seed=seed, attn_implementation=attn_implementation
        )
        notes = {**notes, "config_changes": changes}
    params = count_parameters(model)
    if params >= teacher_params:
        raise EngineError(
            "student_incompatible",
            f"the smallest derivable student has {params:,} parameters, not fewer than the teacher's "
            f"{teacher_params:,}; name a smaller student (student kind 'config', 'local' or 'hub')",
        )
    return model, notes


@dataclass
class NamedVisionStudent:
    model: PreTrainedModel
    notes: dict[str, Any] = field(default_factory=dict)


def load_pretrained_student(
    location: str, *, num_labels: int, trust_remote_code: bool, attn_implementation: str | None, name: str
) -> NamedVisionStudent:
    """A hub id or save_pretrained directory as an image classifier with `num_labels` outputs."""
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            location,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code,
            weights_only=True,
            output_loading_info=True,
            **_attn_kwargs(attn_implementation),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(
            "student_not_found", f"student '{name}' could not be loaded from '{location}': {exc}"
        ) from exc
    fresh = [str(k) for k in info.get("missing_keys", [])]
    fresh += [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    return NamedVisionStudent(
        model=model.eval(),
        notes={
            "architecture": type(model).__name__,
            "initialised_from": "pretrained",
            "new_head": bool(fresh),
            "freshly_initialised": sorted(fresh)[:8],
        },
    )


def config_student(
    overrides: dict[str, Any],
    teacher: nn.Module,
    *,
    num_labels: int,
    channels: int,
    image_size: tuple[int, int],
    seed: int,
    attn_implementation: str | None,
) -> NamedVisionStudent:
    """Student kind 'config': the teacher's config with `overrides`, or a fresh `model_type` config."""
    overrides = dict(overrides)
    model_type = overrides.pop("model_type", None)
    teacher_config = teacher.config if isinstance(teacher, PreTrainedModel) else None
    if model_type is None and teacher_config is None:
        raise EngineError(
            "student_incompatible",
            "a .pt2 teacher has no config to override: give overrides with a 'model_type' "
            "(e.g. {'model_type': 'mobilenet_v2', 'depth_multiplier': 0.35})",
        )
    if model_type is not None and (teacher_config is None or model_type != teacher_config.model_type):
        base: dict[str, Any] = {"num_labels": num_labels, "num_channels": channels}
        try:
            probe = AutoConfig.for_model(str(model_type))
        except ValueError as exc:
            raise EngineError(
                "student_incompatible", f"unknown student model_type '{model_type}': {exc}"
            ) from exc
        if hasattr(probe, "image_size"):
            base["image_size"] = image_size[0] if image_size[0] == image_size[1] else list(image_size)
        try:
            config = AutoConfig.for_model(str(model_type), **{**base, **overrides})
        except (TypeError, ValueError) as exc:
            raise EngineError("student_incompatible", f"student config {overrides}: {exc}") from exc
        model, notes = student_from_config(config, None, seed=seed, attn_implementation=attn_implementation)
        return NamedVisionStudent(model=model, notes={**notes, "new_head": True, "config_changes": overrides})
    assert teacher_config is not None
    unknown = sorted(k for k in overrides if not hasattr(teacher_config, k))
    if unknown:
        raise EngineError(
            "student_incompatible",
            f"student overrides {unknown} are not fields of the teacher's {teacher_config.model_type} config",
        )
    try:
        config = _with(teacher_config, overrides)
        model, notes = student_from_config(
            config, teacher, seed=seed, attn_implementation=attn_implementation
        )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EngineError("student_incompatible", f"student config {overrides}: {exc}") from exc
    return NamedVisionStudent(model=model, notes={**notes, "new_head": False, "config_changes": overrides})


def feature_grids(
    hidden_states: Iterable[torch.Tensor], pixel_shape: torch.Size, config: Any
) -> list[torch.Tensor]:
    """Hidden states as channel-last spatial grids (B, h, w, C): CNN maps permuted, ViT patch tokens
    reshaped (class/distillation tokens dropped), so a 1x1-conv regressor is a Linear on the last dim."""
    grids = []
    for state in hidden_states:
        if state.dim() == 4:  # (B, C, h, w)
            grids.append(state.permute(0, 2, 3, 1))
        elif state.dim() == 3:  # (B, T, D)
            patch = getattr(config, "patch_size", None)
            if not isinstance(patch, int):
                raise EngineError("unsupported", f"cannot lay out {config.model_type} tokens as a grid")
            gh, gw = pixel_shape[-2] // patch, pixel_shape[-1] // patch
            extra = state.shape[1] - gh * gw
            if extra < 0:
                raise EngineError(
                    "unsupported", f"{config.model_type}: {state.shape[1]} tokens for a {gh}x{gw} grid"
                )
            grids.append(state[:, extra:].reshape(state.shape[0], gh, gw, state.shape[2]))
        else:
            raise EngineError(
                "unsupported", f"hidden state of shape {tuple(state.shape)} is not a feature map"
            )
    return grids


def has_attention_maps(model: nn.Module) -> bool:
    """Transformer encoders that can return (B, heads, T, T) attention maps (ViT, DeiT, ...)."""
    return (
        isinstance(model, PreTrainedModel)
        and hasattr(model.config, "num_attention_heads")
        and not hasattr(model.config, "depths")
    )
