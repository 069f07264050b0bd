"""`run_job`: the one entry point the Celery task, the CLI runner, tests and benchmarks all call.

Phases: data -> teacher (built/loaded, then frozen) -> [baseline] -> distillation stage(s) -> evaluate ->
post-training (adapter hook) -> export. A checkpoint (`checkpoints/last.pt`) is written when each run starts
and after every epoch; `resume=True` continues exactly from it.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.schemas.job_spec import Device, DistillationMethod, JobSpec, UploadedDataset
from app.schemas.results import DistillationResults
from app.schemas.teachers import DEFAULT_TEACHERS, TeacherSource, TeacherSourceKind
from workers.distill.adapters import get_adapter
from workers.distill.adapters.base import TaskAdapter, TaskData, count_parameters, model_size_mb
from workers.distill.contract import (
    ARTIFACT_EXPORT,
    ARTIFACT_RESULTS,
    EngineCallbacks,
    EngineError,
    JobPaths,
    NullCallbacks,
    Progress,
)
from workers.distill.metrics import measure_latency_ms
from workers.distill.trainer import (
    Progressor,
    RunPlan,
    StopChecker,
    eval_loader,
    flush_checkpoints,
    load_checkpoint,
    save_checkpoint,
    train_run,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.safetensors"
CHECKPOINT_FORMAT = 2
# Overall progress fractions at which phases begin.
TEACHER_END = 0.15
TRAINING_END = 0.92


class _PhaseCallbacks:
    """Rescales a phase's own 0..1 progress into its slice [start, end] of the job."""

    def __init__(self, inner: EngineCallbacks, start: float, end: float) -> None:
        self.inner = inner
        self.start = start
        self.end = end

    def on_progress(self, progress: Progress) -> None:
        fraction = self.start + (self.end - self.start) * min(max(progress.fraction, 0.0), 1.0)
        self.inner.on_progress(
            Progress(
                phase=progress.phase,
                fraction=fraction,
                stage=progress.stage,
                epoch=progress.epoch,
                step=progress.step,
                total_steps=progress.total_steps,
                metrics=progress.metrics,
                eta_seconds=progress.eta_seconds,
            )
        )

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.inner.on_event(kind, message, data)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def resolve_device(requested: Device) -> torch.device:
    """cuda when asked (and present) or when auto finds one; else cpu."""
    if requested == Device.cuda:
        if not torch.cuda.is_available():
            raise EngineError(
                "device_unavailable", "training_config.device is 'cuda' but this worker has no CUDA device"
            )
        return torch.device("cuda")
    if requested == Device.auto and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_teacher(name_or_path: str) -> TeacherSource:
    """A default-registry teacher by name, or a local directory (the CLI runner accepts paths)."""
    for source in DEFAULT_TEACHERS:
        if source.name == name_or_path:
            return source
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return TeacherSource(
            name=path.name, kind=TeacherSourceKind.local, location=str(path.resolve()), type="local"
        )
    names = ", ".join(t.name for t in DEFAULT_TEACHERS)
    raise EngineError(
        "teacher_not_found", f"unknown teacher '{name_or_path}': not one of {names}, nor a directory"
    )


def build_plans(spec: JobSpec, adapter: TaskAdapter) -> list[RunPlan]:
    """The runs of a job: the optional labels-only baseline, then one stage (or num_stages if progressive)."""
    config = spec.training_config
    plans: list[RunPlan] = []
    if config.baseline:
        plans.append(
            RunPlan(
                "baseline",
                0,
                spec.target_compression,
                config.temperature,
                0.0,
                config.epochs,
                {"hard_target_ce": 1.0},
            )
        )
    stages = config.num_stages if spec.distillation_method == DistillationMethod.progressive else 1
    for k in range(1, stages + 1):
        temperature = min(
            10.0, max(1.0, config.temperature + (k - 1) * config.stage_schedule.temperature_step)
        )
        alpha = min(1.0, max(0.0, config.alpha + (k - 1) * config.stage_schedule.alpha_step))
        ratio = spec.target_compression ** (k / stages)
        weights = adapter.loss_weights(spec, temperature=temperature, alpha=alpha)
        plans.append(RunPlan("distill", k, ratio, temperature, alpha, config.epochs, weights))
    return plans


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _evaluate(adapter: TaskAdapter, model: nn.Module, data: TaskData, device: torch.device) -> float:
    return adapter.evaluate(model, eval_loader(data.test, data), device)


def run_job(
    spec: JobSpec,
    *,
    teacher: TeacherSource,
    paths: JobPaths,
    data_dir: Path,
    callbacks: EngineCallbacks | None = None,
    resume: bool = True,
    file_root: Path | None = None,
    trust_remote_code: bool = False,
) -> DistillationResults:
    """Run one distillation job end to end; writes artifacts and returns (and stores) its results.

    Raises EngineError(code, message) on failures a person can act on, JobStopped when `should_stop()`
    answered True (the last checkpoint is kept).
    """
    callbacks = callbacks or NullCallbacks()
    threads = get_adapter(spec.task).cpu_threads()
    previous_threads = torch.get_num_threads()
    if threads is not None and resolve_device(spec.training_config.device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _run_job(
            spec,
            teacher=teacher,
            paths=paths,
            data_dir=data_dir,
            callbacks=callbacks,
            resume=resume,
            file_root=file_root,
            trust_remote_code=trust_remote_code,
        )
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        raise _oom_error(spec) from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise _oom_error(spec) from exc
        raise
    finally:
        # JobStopped, errors and results all leave only once the last checkpoint is on disk.
        flush_checkpoints()
        torch.set_num_threads(previous_threads)


def _oom_error(spec: JobSpec) -> EngineError:
    return EngineError(
        "out_of_memory",
        f"the job ran out of memory with batch_size {spec.training_config.batch_size}; lower "
        "training_config.batch_size (or max_seq_length), or use a smaller teacher",
    )


def _run_job(
    spec: JobSpec,
    *,
    teacher: TeacherSource,
    paths: JobPaths,
    data_dir: Path,
    callbacks: EngineCallbacks,
    resume: bool,
    file_root: Path | None,
    trust_remote_code: bool,
) -> DistillationResults:
    job_started = time.monotonic()
    config = spec.training_config
    if isinstance(spec.dataset_config, UploadedDataset):
        raise EngineError(
            "dataset_unresolved",
            f"dataset '{spec.dataset_config.dataset_id}' is an upload; "
            "the caller must resolve it to a file dataset first",
        )
    adapter = get_adapter(spec.task)
    device = resolve_device(config.device)
    stopper = StopChecker(callbacks)
    torch.manual_seed(config.seed)

    def phase(name: str, message: str, fraction: float, **data: Any) -> None:
        callbacks.on_event("phase", message, {"phase": name, **data})
        callbacks.on_progress(Progress(phase=name, fraction=fraction))
        stopper.check(f"before phase {name}")

    phase("data", "loading data", 0.0, device=str(device))
    data = adapter.load_data(spec, data_dir=data_dir, file_root=file_root)

    phase("teacher", f"preparing teacher {teacher.name}", 0.0)
    teacher_model = adapter.load_teacher(
        teacher,
        spec,
        data,
        data_dir=data_dir,
        file_root=file_root,
        device=device,
        callbacks=_PhaseCallbacks(callbacks, 0.0, TEACHER_END),
        trust_remote_code=trust_remote_code,
    )
    _freeze(teacher_model.to(device))
    stopper.check("after preparing the teacher")
    teacher_metric = _evaluate(adapter, teacher_model, data, device)
    teacher_params = count_parameters(teacher_model)
    callbacks.on_event(
        "phase",
        "teacher ready",
        {"phase": "teacher", adapter.metric: teacher_metric, "parameters": teacher_params},
    )

    plans = build_plans(spec, adapter)
    checkpoint_path = paths.checkpoints / CHECKPOINT_FILE
    spec_json = spec.model_dump(mode="json")
    saved = load_checkpoint(checkpoint_path) if resume else None
    if saved is not None and (saved.get("format") != CHECKPOINT_FORMAT or saved.get("spec") != spec_json):
        callbacks.on_event("checkpoint", "checkpoint belongs to another spec; starting afresh", {})
        saved = None
    if saved is not None:
        callbacks.on_event(
            "checkpoint",
            "resuming from checkpoint",
            {"run_index": saved["run_index"], "epoch": (saved["run"] or {}).get("epoch")},
        )

    if saved is not None:
        initial_metric = float(saved["initial_student_accuracy"])
        completed: list[dict[str, Any]] = list(saved["completed"])
        start_index = int(saved["run_index"])
    else:
        fresh = adapter.build_student(teacher_model, spec.target_compression, seed=config.seed)
        initial_metric = _evaluate(adapter, fresh.to(device), data, device)
        completed = []
        start_index = 0

    steps_per_epoch = -(-len(data.train) // config.batch_size)  # type: ignore[arg-type]
    progressor = Progressor(
        callbacks,
        start=TEACHER_END,
        end=TRAINING_END,
        total_steps=sum(p.epochs for p in plans) * steps_per_epoch,
        steps_before=sum(p.epochs for p in plans[:start_index]) * steps_per_epoch,
    )

    def write_checkpoint(run_index: int, run_payload: dict[str, Any] | None) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "spec": spec_json,
                "initial_student_accuracy": initial_metric,
                "run_index": run_index,
                "run": run_payload,
                "completed": completed,
            },
        )

    def stage_student(record: dict[str, Any]) -> nn.Module:
        model = adapter.build_student(teacher_model, record["ratio"], seed=config.seed)
        model.load_state_dict(record["best_state"])
        return model.to(device)

    training_started = time.monotonic()
    for index in range(start_index, len(plans)):
        plan = plans[index]
        name = "baseline" if plan.kind == "baseline" else "distill"
        phase(name, f"{name} stage {plan.stage}: ratio {plan.ratio:.4g}", progressor.start, stage=plan.stage)
        student = adapter.build_student(teacher_model, plan.ratio, seed=config.seed)
        run_teacher: nn.Module | None = None
        if plan.kind == "distill":
            previous = [r for r in completed if r["kind"] == "distill"]
            run_teacher = _freeze(stage_student(previous[-1])) if previous else teacher_model
        resume_payload = saved["run"] if saved is not None and index == start_index else None
        run_started = time.monotonic()
        state, cache_info = train_run(
            plan=plan,
            student=student,
            teacher=run_teacher,
            adapter=adapter,
            data=data,
            spec=spec,
            device=device,
            callbacks=callbacks,
            progressor=progressor,
            checkpoint=functools.partial(write_checkpoint, index),
            resume_from=resume_payload,
            stopper=stopper,
        )
        final_metric = _evaluate(adapter, student, data, device)
        assert state.best_state is not None
        student.load_state_dict(state.best_state)
        best_metric = _evaluate(adapter, student, data, device)
        completed.append(
            {
                "kind": plan.kind,
                "stage": plan.stage,
                "ratio": plan.ratio,
                "temperature": plan.temperature,
                "alpha": plan.alpha,
                "parameters": count_parameters(student),
                "best_val": state.best_metric,
                "best_epoch": state.best_epoch,
                "best_test": best_metric,
                "final_test": final_metric,
                "history": state.history,
                "best_state": state.best_state,
                "cache_used": cache_info["used"],
                "cache_seconds": cache_info["seconds"],
                "seconds": time.monotonic() - run_started,
            }
        )
        progressor.steps_before += plan.epochs * steps_per_epoch
        write_checkpoint(index + 1, None)
    training_seconds = time.monotonic() - training_started

    phase("evaluate", "measuring teacher and student", TRAINING_END)
    distilled = [r for r in completed if r["kind"] == "distill"]
    final_record = distilled[-1]
    student = _freeze(stage_student(final_record))
    student_params = count_parameters(student)
    latency = {"teacher": {}, "student": {}}  # type: dict[str, dict[str, float]]
    for batch_size in (1, 64):
        batch = adapter.example_batch(data, batch_size)
        for role, model in (("teacher", teacher_model), ("student", student)):
            stopper.check("while measuring latency")
            latency[role][f"batch_{batch_size}"] = measure_latency_ms(adapter, model, batch, device)
    speedup = latency["teacher"]["batch_64"] / latency["student"]["batch_64"]
    teacher_mb, student_mb = model_size_mb(teacher_model), model_size_mb(student)

    phase("compress", "post-training steps", 0.94)
    extra = adapter.post_training(
        student,
        data,
        spec,
        out_dir=paths.artifacts,
        device=device,
        callbacks=_PhaseCallbacks(callbacks, 0.94, 0.97),
    )

    phase("export", "writing artifacts", 0.97)
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    adapter.save_student(student, paths.artifacts, data)
    adapter.export_program(student, paths.artifacts / ARTIFACT_EXPORT, data)

    baseline = next((r for r in completed if r["kind"] == "baseline"), None)
    best = float(final_record["best_test"])
    ratio = student_params / teacher_params
    history = [
        {k: v for k, v in entry.items() if k != "losses"} | {"losses": entry.get("losses", {})}
        for record in distilled
        for entry in record["history"]
    ]
    results = DistillationResults(
        task=str(spec.task),
        metric=adapter.metric,
        device=str(device),
        teacher_name=teacher.name,
        distillation_method=str(spec.distillation_method),
        teacher_accuracy=teacher_metric,
        initial_student_accuracy=initial_metric,
        final_student_accuracy=float(final_record["final_test"]),
        best_student_accuracy=best,
        accuracy_retention=adapter.retention(teacher_metric, best),
        original_parameters=teacher_params,
        compressed_parameters=student_params,
        compression_ratio=ratio,
        target_compression=spec.target_compression,
        parameter_reduction=1.0 - ratio,
        model_size_mb={"teacher": teacher_mb, "student": student_mb},
        memory_savings=1.0 - student_mb / teacher_mb,
        latency_ms=latency,
        inference_speedup=speedup,
        cost_savings=1.0 - 1.0 / speedup,
        training_history=history,
        stages=[
            {
                "stage": r["stage"],
                "compression_ratio": r["parameters"] / teacher_params,
                "parameters": r["parameters"],
                "best_student_accuracy": r["best_test"],
                "temperature": r["temperature"],
                "alpha": r["alpha"],
                "best_epoch": r["best_epoch"],
                "teacher_cache_used": r["cache_used"],
                "cache_seconds": r["cache_seconds"],
                "seconds": r["seconds"],
            }
            for r in distilled
        ],
        baseline_accuracy=baseline["best_test"] if baseline else None,
        kd_gain=(best - baseline["best_test"]) * 100.0 if baseline else None,
        baseline_history=baseline["history"] if baseline else None,
        teacher_cache_used=all(r["cache_used"] for r in distilled),
        training_seconds=training_seconds,
        total_seconds=time.monotonic() - job_started,
        **extra,
    )
    (paths.artifacts / ARTIFACT_RESULTS).write_text(results.model_dump_json(indent=2), encoding="utf-8")
    callbacks.on_event(
        "phase",
        "done",
        {"phase": "done", "best_student_accuracy": best, "retention": results.accuracy_retention},
    )
    callbacks.on_progress(Progress(phase="done", fraction=1.0, eta_seconds=0.0))
    return results


def read_results(paths: JobPaths) -> dict[str, Any]:
    """The stored results.json of a finished job."""
    results: dict[str, Any] = json.loads((paths.artifacts / ARTIFACT_RESULTS).read_text(encoding="utf-8"))
    return results
