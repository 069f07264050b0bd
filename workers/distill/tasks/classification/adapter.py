"""The `classification` adapter: digits (or a numeric table), CNN/MLP teachers, scaled MLP students."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from app.core.paths import PathKind
from app.schemas.job_spec import DistillationMethod, JobSpec, Task
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.adapter import BuiltStudent, TaskAdapter
from workers.distill.contract import (
    ARTIFACT_CONFIG,
    ARTIFACT_WEIGHTS,
    EngineCallbacks,
    EngineError,
    NamedStudent,
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
from workers.distill.tasks.classification.programs import (
    PROGRAM_SUFFIXES,
    ProgramTeacher,
    load_program_teacher,
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
        del trust_remote_code
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
            program = Path(source.location).suffix in PROGRAM_SUFFIXES
            location = resolve_local_path(
                source.location,
                file_root,
                kind=PathKind.file if program else PathKind.directory,
                what="teacher program" if program else "teacher directory",
                missing_code="teacher_not_found",
            )
            if location.is_file() and location.suffix in PROGRAM_SUFFIXES:
                return self._program_teacher(location, spec, data, device)
            teacher = load_model_dir(location)
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

    def _program_teacher(
        self, path: Path, spec: JobSpec, data: TaskData, device: torch.device
    ) -> ProgramTeacher:
        """A `.pt2` teacher, its input and output checked against the data and the method."""
        teacher = load_program_teacher(path, device)
        signature = teacher.signature
        if signature.in_features != data.info["in_features"]:
            raise EngineError(
                "dataset_invalid",
                f"the teacher program takes input {('batch', *signature.input_dims)} "
                f"({signature.in_features} values per example), the data has {data.info['in_features']} "
                "feature columns",
            )
        if signature.num_classes != data.num_labels:
            raise EngineError(
                "dataset_invalid",
                f"the teacher program predicts {signature.num_classes} classes, the data has "
                f"{data.num_labels} labels",
            )
        if spec.distillation_method in (DistillationMethod.feature, DistillationMethod.attention):
            raise EngineError(
                "unsupported",
                f"a torch.export teacher gives only logits: use response_distillation (or progressive), "
                f"not {spec.distillation_method}",
            )
        return teacher

    def build_student(self, teacher: nn.Module, target_compression: float, *, seed: int) -> nn.Module:
        if isinstance(teacher, ProgramTeacher):
            return _student_of_program(teacher, target_compression, seed=seed)
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
        """A local/registry model directory (safetensors + student_config.json), or config overrides.

        Overrides apply to the teacher's family (MLP: hidden_size, num_hidden_layers; CNN: channels,
        hidden_size; a program teacher's family is its derived student's); tensors whose shapes allow are
        initialised from the teacher. A student for other labels gets a new head (said in the notes).
        """
        del trust_remote_code
        if student.kind == "config":
            model, notes = _config_student(student.overrides, teacher, seed=spec.training_config.seed)
        else:
            source = student.source
            assert source is not None
            if source.kind != TeacherSourceKind.local:
                raise EngineError(
                    "student_incompatible",
                    f"student '{student.name}' is a {source.kind} model; task 'classification' takes a local "
                    "directory of safetensors + student_config.json (a finished job's artifacts), a "
                    "registered one, or config overrides",
                )
            location = resolve_local_path(
                source.location,
                file_root,
                kind=PathKind.any,
                what="student directory",
                missing_code="student_not_found",
            )
            if location.is_file():
                raise EngineError(
                    "student_incompatible",
                    f"student '{student.name}' is a file; a student must be trainable: give a directory of "
                    "safetensors + student_config.json",
                )
            try:
                model = load_model_dir(location)
            except EngineError as exc:
                raise EngineError("student_not_found", exc.message) from exc
            notes = {"initialised_from": "pretrained", "location": str(location)}
        model.train()
        config = small_model_config(model)
        if config["in_features"] != data.info["in_features"]:
            raise EngineError(
                "student_incompatible",
                f"the student takes {config['in_features']} features, "
                f"the data has {data.info['in_features']}",
            )
        notes["new_head"] = False
        if config["num_classes"] != data.num_labels:
            assert data.num_labels is not None
            _replace_head(model, data.num_labels)
            notes["new_head"] = True
        return BuiltStudent(model=model, notes={"architecture": type(model).__name__, **notes, **config})

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


def _student_of_program(teacher: ProgramTeacher, target_compression: float, *, seed: int) -> nn.Module:
    """The derived student of a program teacher: a SmallCNN for one-channel square images, else an MLP."""
    signature = teacher.signature
    budget = int(count_parameters(teacher) * target_compression)
    features, classes = signature.in_features, signature.num_classes
    side = math.isqrt(features)
    image = len(signature.input_dims) >= 2 and side * side == features and signature.input_dims[0] == 1
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        if image:
            return SmallCNN(features, classes, **scaled_small_cnn(features, classes, budget))
        return MLP(features, classes, scaled_mlp_hidden(features, classes, budget))
    finally:
        torch.set_rng_state(generator_state)


_CONFIG_FIELDS = {
    "mlp": ("hidden_size", "num_hidden_layers"),
    "cnn": ("channels", "hidden_size"),
}


def _config_student(
    overrides: dict[str, bool | int | float | str], teacher: nn.Module, *, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher's family with `overrides`, initialised from the teacher where shapes allow."""
    if isinstance(teacher, ProgramTeacher):
        base: nn.Module = _student_of_program(teacher, 0.5, seed=seed)  # the program's student family
    elif isinstance(teacher, DigitsCNN | SmallCNN | MLP):
        base = teacher
    else:
        raise EngineError("student_incompatible", f"no config overrides for a {type(teacher).__name__}")
    family = "mlp" if isinstance(base, MLP) else "cnn"
    allowed = _CONFIG_FIELDS[family]
    unknown = sorted(k for k in overrides if k not in allowed)
    if unknown:
        raise EngineError(
            "student_incompatible",
            f"student config overrides {unknown} do not apply to a {type(base).__name__} teacher; "
            f"valid: {', '.join(allowed)}",
        )
    bad = sorted(k for k, v in overrides.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1)
    if bad:
        raise EngineError("student_incompatible", f"student config overrides {bad} must be integers >= 1")
    config = dict(base.config)  # type: ignore[arg-type]
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        if family == "mlp":
            hidden = list(config["hidden"]) or [64]
            width = int(overrides.get("hidden_size", hidden[0]))
            layers = int(overrides.get("num_hidden_layers", len(hidden)))
            model: nn.Module = MLP(config["in_features"], config["num_classes"], [width] * layers)
        else:
            model = SmallCNN(
                config["in_features"],
                config["num_classes"],
                channels=int(overrides.get("channels", config["channels"])),
                hidden=int(overrides.get("hidden_size", config["hidden"])),
            )
    finally:
        torch.set_rng_state(generator_state)
    counts = _initialise_from(model, teacher) if base is teacher else {"copied": 0, "sliced": 0}
    notes = {"initialised_from": "teacher" if base is teacher else "random", "overrides": dict(overrides)}
    return model, notes | {"init_tensors": counts}


@torch.no_grad()
def _initialise_from(student: nn.Module, teacher: nn.Module) -> dict[str, int]:
    """Copy teacher tensors of the same name: whole when shapes match, leading slices when smaller."""
    teacher_state = teacher.state_dict()
    counts = {"copied": 0, "sliced": 0, "random": 0}
    for key, tensor in student.state_dict().items():
        source = teacher_state.get(key)
        if source is None or source.dim() != tensor.dim():
            counts["random"] += 1
        elif source.shape == tensor.shape:
            tensor.copy_(source)
            counts["copied"] += 1
        elif all(a >= b for a, b in zip(source.shape, tensor.shape, strict=True)):
            tensor.copy_(source[tuple(slice(0, n) for n in tensor.shape)])
            counts["sliced"] += 1
        else:
            counts["random"] += 1
    return counts


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh output layer for `num_classes` (MLP.head, CNN fc2); the model's config follows."""
    name = "head" if isinstance(model, MLP) else "fc2"
    old = getattr(model, name)
    setattr(model, name, nn.Linear(old.in_features, num_classes))
    model.config["num_classes"] = num_classes  # type: ignore[index,operator]
