"""The `classification` adapter: digits (or a numeric table), CNN/MLP teachers, scaled MLP students."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from app.core.paths import PathKind
from app.schemas.job_spec import JobSpec, Task
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.adapter import TaskAdapter
from workers.distill.contract import (
    ARTIFACT_CONFIG,
    ARTIFACT_WEIGHTS,
    EngineCallbacks,
    EngineError,
    resolve_local_path,
)
from workers.distill.kernel import Batch, ModelOutputs, TaskData, count_parameters
from workers.distill.tasks.classification.data import load_classification_data
from workers.distill.tasks.classification.models import (
    MLP,
    DigitsCNN,
    SmallCNN,
    model_config,
    scaled_mlp_hidden,
    scaled_small_cnn,
    small_model_config,
)
from workers.distill.tasks.classification.teachers import get_digits_teacher, load_model_dir

BUILTIN_TEACHERS = ("digits-cnn",)


class ClassificationAdapter(TaskAdapter):
    """Built-in/tabular classification: inputs (B, F) float32, labels (B,)."""

    task = Task.classification
    metric = "accuracy"
    higher_is_better = True

    def __init__(self) -> None:
        self.teacher_built_now = False

    def cpu_threads(self) -> int | None:
        """One thread: these models are so small that splitting each op across threads only adds waiting
        (measured: a loaded 2-core machine ran the digits teacher several times slower with 2 threads)."""
        return 1

    def load_data(self, spec: JobSpec, *, data_dir: Path, file_root: Path | None) -> TaskData:
        del data_dir
        return load_classification_data(spec, file_root=file_root)

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
        del spec, trust_remote_code
        if source.kind == TeacherSourceKind.builtin:
            if source.location not in BUILTIN_TEACHERS:
                raise EngineError(
                    "teacher_not_found",
                    f"unknown built-in teacher '{source.location}'; built-in: {', '.join(BUILTIN_TEACHERS)}",
                )
            if data.info.get("source") != "digits":
                raise EngineError(
                    "dataset_invalid", "the built-in digits-cnn teacher is trained on, and takes, digits only"
                )
            teacher, self.teacher_built_now = get_digits_teacher(data_dir, data, callbacks)
        elif source.kind == TeacherSourceKind.local:
            directory = resolve_local_path(
                source.location,
                file_root,
                kind=PathKind.directory,
                what="teacher directory",
                missing_code="teacher_not_found",
            )
            teacher = load_model_dir(directory)
        else:
            raise EngineError(
                "unsupported",
                f"teacher '{source.name}' is a hub model; task 'classification' takes the built-in "
                "digits-cnn or a local directory of safetensors + student_config.json",
            )
        in_features = data.info["in_features"]
        teacher_features = small_model_config(teacher).get("in_features")
        if teacher_features != in_features:
            raise EngineError(
                "dataset_invalid",
                f"the teacher takes {teacher_features} features, the data has {in_features}",
            )
        return teacher.to(device).eval()

    def build_student(self, teacher: nn.Module, target_compression: float, *, seed: int) -> nn.Module:
        if not isinstance(teacher, DigitsCNN | SmallCNN | MLP):
            raise EngineError("unsupported", f"cannot derive a student from {type(teacher).__name__}")
        config = teacher.config
        budget = int(count_parameters(teacher) * target_compression)
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            if isinstance(teacher, MLP):  # an MLP teaches a narrower MLP
                hidden = scaled_mlp_hidden(config["in_features"], config["num_classes"], budget)
                return MLP(config["in_features"], config["num_classes"], hidden)
            # A CNN teaches a scaled CNN: convolutions keep the image prior a small MLP lacks.
            shape = scaled_small_cnn(config["in_features"], config["num_classes"], budget)
            return SmallCNN(config["in_features"], config["num_classes"], **shape)
        finally:
            torch.set_rng_state(generator_state)

    def forward(
        self, model: nn.Module, batch: Batch, *, hidden_states: bool = False, attentions: bool = False
    ) -> ModelOutputs:
        if attentions:
            raise EngineError(
                "unsupported",
                "attention_distillation needs transformer models; CNN/MLP models have no attention maps",
            )
        if hidden_states:
            if not isinstance(model, DigitsCNN | SmallCNN | MLP):
                raise EngineError("unsupported", f"{type(model).__name__} exposes no hidden states")
            logits, hidden = model.forward_with_features(batch["inputs"])  # (B, C), [(B, H_l)]
            return ModelOutputs(logits=logits, hidden_states=hidden)
        return ModelOutputs(logits=model(batch["inputs"]))  # (B, C)

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["labels"]  # (B,)

    def save_student(self, student: nn.Module, out_dir: Path, data: TaskData) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = out_dir / ARTIFACT_WEIGHTS
        state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(weights))
        config = {
            **model_config(student),
            "task": str(self.task),
            "input": {"name": "inputs", "shape": ["batch", data.info["in_features"]], "dtype": "float32"},
            "num_labels": data.num_labels,
        }
        config_path = out_dir / ARTIFACT_CONFIG
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return [weights, config_path]

    def export_program(self, student: nn.Module, path: Path, data: TaskData) -> None:
        module = _Exportable(student).eval()
        example = self.example_batch(data, 4)["inputs"]
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))

    def example_batch(self, data: TaskData, batch_size: int) -> Batch:
        inputs = data.test.tensors["inputs"]  # type: ignore[attr-defined]
        repeats = -(-batch_size // inputs.shape[0])
        return {"inputs": inputs.repeat(repeats, 1)[:batch_size].clone()}  # (batch_size, F)


class _Exportable(nn.Module):
    """The student on CPU in fp32, taking the plain input tensor (B, F) -> logits (B, C)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student.to("cpu", torch.float32)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.student(inputs)
