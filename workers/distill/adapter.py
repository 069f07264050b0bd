"""`TaskAdapter`: the seam between the generic loop and task code (`workers.distill.tasks.<task>`).

The loop (`workers.distill.loop`) and the runner only ever talk to a `TaskAdapter`: they ask it for data,
a teacher, a student, forward passes as `ModelOutputs`, loss targets, the metric, and how to save and
export the student.
Everything about a task (tokenizers, model families, metrics) stays behind this interface.

Contract details an adapter must honour:
- Datasets yield `dict[str, Tensor]` items in a deterministic order (no random augmentation), so that the
  teacher's outputs can be cached once per example index. A `TensorDictDataset` (all items stacked in
  tensors) gives the loop a fast path that skips per-item collation.
- `forward` returns `ModelOutputs`; `hidden_states`/`attentions` only when asked (they cost memory).
- `targets(batch)` is aligned position-for-position with `forward(...).logits` (the loop never shifts
  tokens): `(B,)` labels for classification, `(B, T)` ids for token tasks, `IGNORE_INDEX` (-100) = ignore.
- `loss_weights` names the terms of `workers.distill.losses.LOSSES` the loop sums, with their weights.
- `cache_teacher_outputs` may shrink the teacher's outputs before they are cached (e.g. top-k logits in
  `ModelOutputs.extra`); a loss term registered by the adapter then reads that form.
- All tensors an adapter returns from `forward` live on the model's device; batches the loop passes in
  are already on that device. `evaluate` gets CPU batches and moves them itself (`to_device`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from app.schemas.job_spec import DistillationMethod, JobSpec, Task
from app.schemas.teachers import TeacherSource
from workers.distill.contract import EngineCallbacks, EngineError, NamedStudent
from workers.distill.kernel import IGNORE_INDEX, Batch, ModelOutputs, TaskData, to_device


@dataclass
class StepBatch:
    """What one training step trains on (`TaskAdapter.step_batch`)."""

    batch: Batch  # on the device
    fresh_teacher: bool = False  # the batch is not the cached data: run the teacher on it
    skip_terms: tuple[str, ...] = ()  # loss terms of the plan this step leaves out


@dataclass
class BuiltStudent:
    """A named student as `TaskAdapter.build_named_student` returns it: untrained by this job, on CPU."""

    model: nn.Module
    # What the results say about it (`results.student`), e.g. {"architecture": ..., "new_head": True,
    # "initialised_from": "teacher" | "pretrained" | "random", "layer_mapping": [...], "differences": {...}}.
    notes: dict[str, Any] = field(default_factory=dict)


class TaskAdapter(ABC):
    """Everything task-specific the generic loop needs. One instance per job run."""

    task: ClassVar[Task]
    metric: ClassVar[str] = "accuracy"  # "accuracy" | "perplexity"
    higher_is_better: ClassVar[bool] = True

    @abstractmethod
    def load_data(self, spec: JobSpec, *, data_dir: Path, file_root: Path | None) -> TaskData:
        """The job's train/val/test splits; raise EngineError('dataset_invalid', ...) on bad data."""

    @abstractmethod
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
        """A teacher ready to teach (trained / fine-tuned), on `device`, in eval mode.

        Raise EngineError('teacher_not_found', ...) when the source cannot be loaded. Long preparation
        (building a built-in teacher, fine-tuning a head) reports Progress(phase='teacher'|'teacher_finetune')
        and raises JobStopped when `callbacks.should_stop()`.
        """

    @abstractmethod
    def build_student(self, teacher: nn.Module, target_compression: float, *, seed: int) -> nn.Module:
        """A fresh student with about `target_compression` times the teacher's parameters (on CPU)."""

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
        """The student the client named, checked against this teacher and data before any training.

        Called once per job run, after `load_teacher` (so the data are ready, e.g. tokenised); the runner
        keeps a copy of the returned weights and hands a fresh copy to each run that trains it (and to
        resumes), so loading happens once. What an adapter must do:
        - `student.kind` 'registry' | 'hub' | 'local': load the model at `student.source` (a local path is
          resolved under `file_root`; never unpickle: safetensors, or `weights_only=True`), with this
          task's head; 'config': the teacher's architecture with `student.overrides` applied, initialised
          from the teacher where shapes allow (`spec.training_config.seed` for the rest).
        - Check compatibility and raise EngineError('student_incompatible', message naming the difference)
          when it cannot learn from this teacher: the same number of labels (or a fresh head for them,
          reported as notes["new_head"]); for logit KD on text the same vocabulary; for feature/attention KD
          a layer mapping (`spec.training_config.layer_mapping` or uniform) whose widths the loop projects.
        - Raise EngineError('student_not_found', ...) when the files are missing or unreadable.
        The default refuses: a task supports named students by overriding this.
        """
        del teacher, spec, data, file_root, trust_remote_code
        raise EngineError(
            "unsupported",
            f"task '{self.task}' does not take a '{student.kind}' student yet; use student kind 'derived'",
        )

    @abstractmethod
    def forward(
        self, model: nn.Module, batch: Batch, *, hidden_states: bool = False, attentions: bool = False
    ) -> ModelOutputs:
        """Run `model` on a batch already on its device."""

    @abstractmethod
    def targets(self, batch: Batch) -> torch.Tensor:
        """(B,) labels | (B, T) token ids aligned with the logits; IGNORE_INDEX marks ignored positions."""

    @abstractmethod
    def save_student(self, student: nn.Module, out_dir: Path, data: TaskData) -> list[Path]:
        """Write `student.safetensors` + `student_config.json` (or save_pretrained files); return paths."""

    @abstractmethod
    def export_program(self, student: nn.Module, path: Path, data: TaskData) -> None:
        """`torch.export` the fp32 student to `path` (dynamic batch dim, + sequence length for text)."""

    @abstractmethod
    def example_batch(self, data: TaskData, batch_size: int) -> Batch:
        """A CPU batch of `batch_size` inputs (repeated if the test split is smaller), for latency."""

    # ---- overridable defaults ----------------------------------------------------------------------

    def evaluate(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> float:
        """The metric over `loader` (CPU batches); default: argmax accuracy on non-ignored targets."""
        numerator, denominator = self.evaluate_totals(model, loader, device)
        if denominator == 0:
            raise ValueError("evaluation split has no labelled examples")
        return self.metric_from_totals(numerator, denominator)

    @torch.inference_mode()
    def evaluate_totals(
        self, model: nn.Module, loader: Iterable[Batch], device: torch.device
    ) -> tuple[float, float]:
        """The metric's sums over `loader`, which add up across shards: (correct, labelled targets)."""
        model.eval()
        correct = 0
        total = 0
        for cpu_batch in loader:
            batch = to_device(cpu_batch, device)
            logits = self.forward(model, batch).logits  # (B, C) | (B, T, V)
            targets = self.targets(batch)  # (B,) | (B, T)
            mask = targets != IGNORE_INDEX
            predicted = logits.argmax(dim=-1)
            correct += int((predicted[mask] == targets[mask]).sum())
            total += int(mask.sum())
        return float(correct), float(total)

    def metric_from_totals(self, numerator: float, denominator: float) -> float:
        """The metric from summed `evaluate_totals` (a multi-process job's validation); accuracy here."""
        return numerator / denominator if denominator else 0.0

    def cpu_threads(self) -> int | None:
        """Intra-op threads to train with on CPU (None: leave torch's setting). Tiny models want 1."""
        return None

    def retention(self, teacher_metric: float, student_metric: float) -> float:
        """Student quality relative to the teacher (1.0 = as good)."""
        if self.higher_is_better:
            return student_metric / teacher_metric if teacher_metric else 0.0
        return teacher_metric / student_metric if student_metric else 0.0

    def loss_weights(self, spec: JobSpec, *, temperature: float, alpha: float) -> dict[str, float]:
        """Named loss terms (keys of `losses.LOSSES`) and weights for this job; the loop sums them."""
        del temperature
        weights = {"soft_target_kl": alpha, "hard_target_ce": 1.0 - alpha}
        method = spec.distillation_method
        if method == DistillationMethod.feature:
            weights["feature_kd"] = spec.training_config.feature_weight
        elif method == DistillationMethod.attention:
            weights["attention_kd"] = spec.training_config.attention_weight
        return weights

    def step_batch(
        self,
        batch: Batch,
        indices: torch.Tensor,
        *,
        student: nn.Module,
        data: TaskData,
        spec: JobSpec,
        distilling: bool,
        rng: random.Random,
    ) -> StepBatch:
        """The batch a training step uses instead of `batch` (rows `indices` of the train split).

        Default: the batch itself. Language models replace it with teacher-generated targets
        (sequence-level KD) or student-sampled continuations (on-policy). `rng` is seeded per epoch.
        """
        del indices, student, data, spec, distilling, rng
        return StepBatch(batch)

    def compare_with_teacher(
        self, teacher: nn.Module, student: nn.Module, data: TaskData, device: torch.device
    ) -> dict[str, Any]:
        """Result fields comparing the delivered student with the teacher on test (default: none)."""
        del teacher, student, data, device
        return {}

    def reusable_teacher_signal(self, spec: JobSpec, *, hidden_states: bool, attentions: bool) -> bool:
        """Whether this job's cached teacher outputs may go to the reusable store (default: no)."""
        del spec, hidden_states, attentions
        return False

    def loss_options(self, spec: JobSpec) -> dict[str, Any]:
        """Per-job options the task's loss terms read from `LossInputs.options` (default: none)."""
        del spec
        return {}

    def cache_teacher_outputs(
        self, outputs: ModelOutputs, spec: JobSpec, *, temperature: float | None = None
    ) -> ModelOutputs:
        """Shrink teacher outputs before they go into the cache (default: keep them as they are).

        `temperature` is the run's (a cached form may depend on it, e.g. a top-k tail's normaliser).
        """
        del spec, temperature
        return outputs

    def cache_bytes_per_example(self, outputs: ModelOutputs, batch_size: int) -> int:
        """Bytes one example's cached teacher outputs take (from one cached batch)."""
        tensors = [outputs.logits, *(outputs.hidden_states or ()), *(outputs.attentions or ())]
        tensors += list(outputs.extra.values())
        return sum(t.numel() * t.element_size() for t in tensors) // max(batch_size, 1)

    def export_extras(
        self, student: nn.Module, out_dir: Path, data: TaskData, callbacks: EngineCallbacks
    ) -> dict[str, Any]:
        """More artifacts beside the student (e.g. ONNX) and their result fields; default: none."""
        del student, out_dir, data, callbacks
        return {}
