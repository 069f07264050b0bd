"""The image-classification task adapter: transformers image classifiers and `.pt2` programs.

`load_data` reads where the images are (cheap); `load_teacher` loads the teacher, settles the preprocessing
(job > teacher processor config > teacher config) and the label order (the teacher's id2label when the class
names match), then decodes every split once at the teacher's input size. Batches are
{"pixel_values": (B, C, H, W) float32, "labels": (B,)}.
Methods: response KD; feature KD = FitNets hints on channel-last feature maps; attention KD = attention
transfer on feature maps, or head-averaged attention maps when teacher and student are both ViT-style.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from app.core.paths import PathKind
from app.schemas.job_spec import DistillationMethod, ImageAugmentation, JobSpec, Task
from app.schemas.teachers import TeacherSource
from workers.distill.adapter import BuiltStudent, TaskAdapter
from workers.distill.contract import (
    ARTIFACT_CONFIG,
    ARTIFACT_WEIGHTS,
    EngineCallbacks,
    EngineError,
    NamedStudent,
    resolve_local_path,
)
from workers.distill.kernel import Batch, ModelOutputs, TaskData, TensorDictDataset
from workers.distill.tasks.vision import losses as _vision_losses  # noqa: F401  (registers the terms)
from workers.distill.tasks.vision.data import ImageDataset, ImageSplits, decode_split, read_image_splits
from workers.distill.tasks.vision.export import ONNX_FILE, PixelLogits, export_onnx, export_program
from workers.distill.tasks.vision.models import (
    PROCESSOR_FILE,
    config_student,
    derive_student,
    feature_grids,
    has_attention_maps,
    is_program,
    load_pretrained_student,
    load_vision_teacher,
)
from workers.distill.tasks.vision.preprocess import Preprocessing, from_processor_config


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _attn(spec: JobSpec) -> str | None:
    """Eager attention when attention maps are distilled (sdpa returns none); the family's default else."""
    return "eager" if spec.distillation_method == DistillationMethod.attention else None


class ImageClassificationAdapter(TaskAdapter):
    """Image classifiers; accuracy on the test split."""

    task: ClassVar[Task] = Task.image_classification
    metric = "accuracy"
    higher_is_better = True

    def __init__(self) -> None:
        self.splits: ImageSplits | None = None
        self.prep: Preprocessing | None = None
        self.processor: dict[str, Any] | None = None
        self.label_names: list[str] | None = None
        self.attn: str | None = None
        self.seed = 0
        self.num_labels = 0
        self.derived_notes: dict[str, Any] = {}
        self.teacher_has_attention = False
        self.named_has_attention: bool | None = None  # None: no named student (derived = teacher's family)

    # ---- data and models ---------------------------------------------------------------------------

    def load_data(self, spec: JobSpec, *, data_dir: Path, file_root: Path | None) -> TaskData:
        """Find the images and labels; decoded in `load_teacher`, once the preprocessing is known."""
        del data_dir
        self.splits = read_image_splits(spec, file_root=file_root)
        empty = TensorDictDataset({"labels": torch.zeros(0, dtype=torch.long)})
        info: dict[str, Any] = {"decoded": False, **self.splits.description}
        return TaskData(
            train=empty, val=empty, test=empty, collate=None, num_labels=self.splits.num_labels, info=info
        )

    def _preprocessing(
        self, spec: JobSpec, teacher: nn.Module, processor: dict[str, Any] | None
    ) -> Preprocessing:
        """The job's preprocessing, else the teacher's processor config, else its config's image_size."""
        given = spec.image_config.preprocessing if spec.image_config else None
        if given is not None:
            return Preprocessing.from_spec(given)
        if is_program(teacher):
            raise EngineError(
                "invalid_spec",
                "a .pt2 teacher needs image_config.preprocessing (size, mean, std, ...): the program "
                "does not say how its images were prepared",
            )
        assert isinstance(teacher, PreTrainedModel)
        channels = int(getattr(teacher.config, "num_channels", 3))
        if processor is not None:
            return from_processor_config(processor, channels=channels)
        size = getattr(teacher.config, "image_size", None)
        if isinstance(size, int):
            return Preprocessing(
                height=size,
                width=size,
                resize_shortest_edge=None,
                rescale_factor=1 / 255,
                mean=(0.5,) * channels,
                std=(0.5,) * channels,
                channels=channels,
                source="teacher config (no preprocessor_config.json: mean/std 0.5)",
            )
        raise EngineError(
            "invalid_spec",
            f"teacher has no {PROCESSOR_FILE} and its config no image_size: give image_config.preprocessing",
        )

    def _label_order(self, teacher: nn.Module, names: list[str] | None) -> list[str] | None:
        """The teacher's own class order when its id2label names exactly the dataset's classes."""
        if names is None or not isinstance(teacher, PreTrainedModel):
            return names
        id2label = {int(k): str(v) for k, v in (teacher.config.id2label or {}).items()}
        ordered = [id2label.get(i) for i in range(len(id2label))]
        if len(ordered) == len(names) and set(ordered) == set(names):
            return [str(n) for n in ordered]
        return names

    def load_teacher(
        self,
        source: TeacherSource,
        spec: JobSpec,
        data: TaskData,
        *,
        data_dir: Path,
        file_root: Path | None,
        device: torch.device,
        callbacks: EngineCallbacks,
        trust_remote_code: bool,
    ) -> nn.Module:
        """Load the teacher, settle preprocessing and label order, decode the splits, check the labels."""
        del data_dir
        assert self.splits is not None, "load_data runs before load_teacher"
        self.attn = _attn(spec)
        self.seed = spec.training_config.seed
        loaded = load_vision_teacher(
            source, file_root=file_root, trust_remote_code=trust_remote_code, attn_implementation=self.attn
        )
        teacher = loaded.model
        self.processor = loaded.processor
        self.prep = prep = self._preprocessing(spec, teacher, loaded.processor)
        self.label_names = self._label_order(teacher, self.splits.label_names)
        self.num_labels = self.splits.num_labels
        callbacks.on_event(
            "phase",
            f"decoding images at {prep.height}x{prep.width}",
            {"phase": "teacher", "preprocessing": prep.to_json(), **data.info.get("images", {})},
        )
        augmentation = spec.image_config.augmentation if spec.image_config else ImageAugmentation()
        data.train = decode_split(
            self.splits.train, self.label_names, prep, augmentation=augmentation, seed=self.seed
        )
        data.val = decode_split(self.splits.val, self.label_names, prep)
        data.test = decode_split(self.splits.test, self.label_names, prep)
        data.info.update(decoded=True, preprocessing=prep.to_json(), augmentation=augmentation.model_dump())
        if self.label_names is not None:
            data.info["label_names"] = self.label_names
        teacher.to(device).eval()
        with torch.inference_mode():
            probe = data.test.get_batch(torch.arange(1))
            logits = self.forward(teacher, {k: v.to(device) for k, v in probe.items()}).logits
        if logits.shape[-1] != self.splits.num_labels:
            raise EngineError(
                "teacher_invalid",
                f"teacher '{source.name}' predicts {logits.shape[-1]} classes; the dataset has "
                f"{self.splits.num_labels}"
                + (f" ({', '.join(self.label_names[:10])})" if self.label_names else ""),
            )
        self.teacher_has_attention = has_attention_maps(teacher)
        if spec.distillation_method in (
            DistillationMethod.feature,
            DistillationMethod.attention,
        ) and is_program(teacher):
            raise EngineError(
                "unsupported",
                "a .pt2 teacher gives logits only: use response_distillation or progressive_distillation",
            )
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    def _channels_and_labels(self, data: TaskData) -> tuple[int, int]:
        assert self.prep is not None and data.num_labels is not None
        return self.prep.channels, data.num_labels

    def _finish_student(self, model: PreTrainedModel) -> PreTrainedModel:
        """Label names into the config, so save_pretrained students say what they predict."""
        if self.label_names is not None:
            model.config.id2label = dict(enumerate(self.label_names))
            model.config.label2id = {name: i for i, name in enumerate(self.label_names)}
        return model.cpu()

    def build_student(self, teacher: nn.Module, target_compression: float, *, seed: int) -> nn.Module:
        """Same family, fewer/narrower blocks, initialised from the teacher where shapes allow."""
        assert self.prep is not None
        model, notes = derive_student(
            teacher,
            target_compression,
            num_labels=self.num_labels,
            channels=self.prep.channels,
            seed=seed,
            attn_implementation=self.attn,
        )
        self.derived_notes = notes
        return self._finish_student(model)

    def build_named_student(
        self,
        student: NamedStudent,
        teacher: nn.Module,
        spec: JobSpec,
        data: TaskData,
        *,
        file_root: Path | None,
        trust_remote_code: bool,
    ) -> BuiltStudent:
        """A hub / local / registry image classifier (fresh head when needed), or a 'config' student."""
        channels, num_labels = self._channels_and_labels(data)
        assert self.prep is not None
        if student.kind == "config":
            built = config_student(
                dict(student.overrides or {}),
                teacher,
                num_labels=num_labels,
                channels=channels,
                image_size=(self.prep.height, self.prep.width),
                seed=spec.training_config.seed,
                attn_implementation=self.attn,
            )
        else:
            source = student.source
            assert source is not None
            location = source.location
            if source.kind == "local":
                directory = resolve_local_path(
                    location,
                    file_root,
                    kind=PathKind.directory,
                    what="student directory",
                    missing_code="student_not_found",
                )
                if not (directory / "config.json").is_file():
                    raise EngineError(
                        "student_not_found",
                        f"student '{student.name}': {directory} has no config.json (a student must be a "
                        "trainable transformers model; a .pt2 program cannot be trained)",
                    )
                location = str(directory)
            built = load_pretrained_student(
                location,
                num_labels=num_labels,
                trust_remote_code=trust_remote_code,
                attn_implementation=self.attn,
                name=student.name,
            )
        model = built.model
        config = model.config
        if int(getattr(config, "num_channels", channels)) != channels:
            raise EngineError(
                "student_incompatible",
                f"student '{student.name}' takes {config.num_channels}-channel images; the teacher's input "
                f"has {channels}",
            )
        size = getattr(config, "image_size", None)
        if has_attention_maps(model) and size is not None:
            expected = [self.prep.height, self.prep.width]
            given = [size, size] if isinstance(size, int) else list(size)
            if given != expected:
                raise EngineError(
                    "student_incompatible",
                    f"student '{student.name}' is a {config.model_type} for {given[0]}x{given[1]} images; "
                    f"the teacher's input is {expected[0]}x{expected[1]} (set image_size in its config)",
                )
        assert isinstance(data.test, ImageDataset)
        try:
            with torch.inference_mode():
                probe = data.test.get_batch(torch.arange(1))
                logits = self.forward(model.eval(), probe).logits
        except EngineError:
            raise
        except RuntimeError as exc:
            raise EngineError(
                "student_incompatible",
                f"student '{student.name}' cannot run on {self.prep.height}x{self.prep.width} images: {exc}",
            ) from exc
        if logits.shape[-1] != num_labels:
            raise EngineError(
                "student_incompatible",
                f"student '{student.name}' predicts {logits.shape[-1]} classes, not {num_labels}",
            )
        # Attention maps are compared token for token: a ViT student with another patch grid learns by
        # attention transfer on its feature maps instead.
        same_grid = getattr(config, "patch_size", None) == getattr(
            getattr(teacher, "config", None), "patch_size", None
        )
        self.named_has_attention = has_attention_maps(model) and same_grid
        return BuiltStudent(model=self._finish_student(model), notes=built.notes)

    # ---- forward, targets, losses ------------------------------------------------------------------

    def forward(
        self, model: nn.Module, batch: Batch, *, hidden_states: bool = False, attentions: bool = False
    ) -> ModelOutputs:
        """Logits (B, K); channel-last feature maps (B, h, w, C) per layer; attentions (B, heads, T, T)."""
        pixels = batch["pixel_values"]  # (B, C, H, W)
        if not isinstance(model, PreTrainedModel):
            if hidden_states or attentions:
                raise EngineError("unsupported", "a .pt2 model gives logits only: use response_distillation")
            return ModelOutputs(logits=model(pixels))
        kwargs: dict[str, Any] = {}
        if hidden_states:
            kwargs["output_hidden_states"] = True
        if attentions:
            kwargs["output_attentions"] = True
        output = model(pixel_values=pixels, **kwargs)
        grids = feature_grids(output.hidden_states, pixels.shape, model.config) if hidden_states else None
        maps = None
        if attentions:
            maps = getattr(output, "attentions", None)
            if not maps:
                raise EngineError("unsupported", f"{model.config.model_type} returns no attention maps")
            maps = tuple(maps)
        return ModelOutputs(logits=output.logits, hidden_states=grids, attentions=maps)

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["labels"]  # (B,)

    def loss_weights(self, spec: JobSpec, *, temperature: float, alpha: float) -> dict[str, float]:
        """Response KD + labels; FitNets hints for feature KD; attention maps (ViT pairs) or attention
        transfer on feature maps (any other pair) for attention KD."""
        del temperature
        weights = {"soft_target_kl": alpha, "hard_target_ce": 1.0 - alpha}
        config = spec.training_config
        if spec.distillation_method == DistillationMethod.feature:
            weights["feature_map_hint"] = config.feature_weight
        elif spec.distillation_method == DistillationMethod.attention:
            student_maps = (
                self.teacher_has_attention if self.named_has_attention is None else self.named_has_attention
            )
            if self.teacher_has_attention and student_maps:
                weights["attention_kd"] = config.attention_weight
            else:
                weights["attention_transfer"] = config.attention_weight
        return weights

    def example_batch(self, data: TaskData, batch_size: int) -> Batch:
        """`batch_size` test images (repeated when the split is smaller) at the model's input size."""
        assert isinstance(data.test, ImageDataset)
        indices = torch.arange(batch_size) % len(data.test)
        return {"pixel_values": data.test.get_batch(indices)["pixel_values"]}

    # ---- artifacts ---------------------------------------------------------------------------------

    def _processor_json(self) -> dict[str, Any]:
        """The preprocessing as a transformers image-processor config (the teacher's own when it had one)."""
        if self.processor is not None and (self.prep is None or self.prep.source == "teacher processor"):
            return dict(self.processor)
        assert self.prep is not None
        prep = self.prep
        processor: dict[str, Any] = {
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": prep.rescale_factor,
            "do_normalize": True,
            "image_mean": list(prep.mean),
            "image_std": list(prep.std),
            "resample": 2,
        }
        if prep.resize_shortest_edge is None:
            processor.update(
                image_processor_type="ViTImageProcessor", size={"height": prep.height, "width": prep.width}
            )
        else:
            processor.update(
                image_processor_type="MobileNetV2ImageProcessor",
                size={"shortest_edge": prep.resize_shortest_edge},
                do_center_crop=True,
                crop_size={"height": prep.height, "width": prep.width},
            )
        return processor

    def save_student(self, student: nn.Module, out_dir: Path, data: TaskData) -> list[Path]:
        """save_pretrained + preprocessor_config.json (what the student expects), student.safetensors and
        student_config.json naming how to load it."""
        del data
        assert isinstance(student, PreTrainedModel) and self.prep is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / PROCESSOR_FILE).write_text(json.dumps(self._processor_json(), indent=2))
        _link_or_copy(out_dir / "model.safetensors", out_dir / ARTIFACT_WEIGHTS)
        recipe = {
            "format": "transformers",
            "architecture": type(student).__name__,
            "task": str(self.task),
            "config": "config.json",
            "weights": "model.safetensors",
            "preprocessing": self.prep.to_json(),
            "input": f"pixel_values float32 (B, {self.prep.channels}, {self.prep.height}, {self.prep.width})",
            "load": "transformers.AutoModelForImageClassification.from_pretrained(<this directory>)",
        }
        (out_dir / ARTIFACT_CONFIG).write_text(json.dumps(recipe, indent=2))
        return sorted(p for p in out_dir.iterdir() if p.is_file())

    def export_program(self, student: nn.Module, path: Path, data: TaskData) -> None:
        """torch.export of pixel_values (B, C, H, W) -> logits with a dynamic batch dimension."""
        export_program(PixelLogits(copy.deepcopy(student).cpu()).eval(), path, self.example_batch(data, 2))

    def export_extras(
        self, student: nn.Module, out_dir: Path, data: TaskData, callbacks: EngineCallbacks
    ) -> dict[str, Any]:
        """student.onnx checked against PyTorch; the input resolution, preprocessing and augmentation used."""
        out_dir.mkdir(parents=True, exist_ok=True)
        assert self.prep is not None
        extra: dict[str, Any] = {
            "input_resolution": [self.prep.height, self.prep.width],
            "preprocessing": self.prep.to_json(),
            "augmentation": data.info.get("augmentation"),
            "images": data.info.get("images"),
        }
        if self.label_names is not None:
            extra["label_names"] = self.label_names
        if self.derived_notes:
            extra["student_derivation"] = self.derived_notes
        try:
            difference = export_onnx(
                PixelLogits(copy.deepcopy(student).cpu()).eval(),
                out_dir / ONNX_FILE,
                self.example_batch(data, 2),
            )
        except EngineError as exc:
            callbacks.on_event("warning", f"ONNX export failed: {exc.message}", {"phase": "export"})
            return {**extra, "onnx_export": {"file": None, "error": exc.message}}
        return {**extra, "onnx_export": {"file": ONNX_FILE, "max_abs_difference": difference}}
