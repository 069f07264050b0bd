"""`run_job`: the one entry point the Celery task, the CLI runner, tests and benchmarks all call.

A job is a sequence of named phases, each a function below:
`load_data` -> `prepare_teacher` -> `prepare_student` -> [`search_student_size` with target_retention]
-> `train_stages` (the optional labels-only baseline, then one distillation stage, or `num_stages` if
progressive; once per `training_config.seeds` with `train_other_seeds`) -> `measure` -> `compress` ->
`export` -> `write_results`.
Progress is one monotone figure over the whole job: `PROGRESS_TABLE` gives each phase its slice, and the
training slice is shared by the search's trials, each seed's runs, the baseline and the stages in
proportion to their expected epochs x steps (`training_spans`).
A checkpoint (`checkpoints/last.safetensors`) is written when each run starts and after every epoch
(throttled by `EngineConfig.checkpoint_min_interval_s`); `resume=True` continues exactly from it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.core.paths import PathKind, PathRefused, resolve_path
from app.schemas.job_spec import (
    DerivedStudent,
    Device,
    DistillationMethod,
    JobSpec,
    RegistryStudent,
    Selection,
    UploadedDataset,
)
from app.schemas.results import DistillationResults
from app.schemas.teachers import DEFAULT_TEACHERS, TeacherSource, TeacherSourceKind
from workers.distill.adapter import BuiltStudent, TaskAdapter
from workers.distill.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    flush_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from workers.distill.compress import compress_student
from workers.distill.config import EngineConfig
from workers.distill.contract import (
    ARTIFACT_EXPORT,
    ARTIFACT_RESULTS,
    EngineCallbacks,
    EngineError,
    JobPaths,
    JobStopped,
    NamedStudent,
    NullCallbacks,
    Progress,
    StopChecker,
    await_write,
)
from workers.distill.kept import KeptCheckpoints, StartFrom
from workers.distill.kernel import TaskData, count_parameters, model_size_mb
from workers.distill.loop import Progressor, RunPlan, eval_loader, train_run
from workers.distill.metrics import measure_latency_ms
from workers.distill.registry import get_adapter
from workers.distill.search import SearchOutcome, SearchSettings, Trial, run_search

if TYPE_CHECKING:
    from workers.distill.distributed import RankGroup

__all__ = [
    "CHECKPOINT_FILE",
    "PROGRESS_TABLE",
    "build_plans",
    "named_student",
    "resolve_teacher",
    "run_job",
    "run_job_rank",
]

logger = logging.getLogger(__name__)

# The one table of progress: the slice [start, end) of the job's 0..1 progress each phase covers, in order,
# sized by the work a typical job spends there. "training" is shared by the baseline and the distillation
# stages in proportion to their epochs x steps per epoch (see `train_stages`); the teacher's slice covers
# building or fine-tuning it (instant when it is reused).
# "search" (target_retention) shares the training slice with the final training: see `training_spans`.
PROGRESS_TABLE: dict[str, tuple[float, float]] = {
    "data": (0.00, 0.02),
    "teacher": (0.02, 0.15),
    "search": (0.15, 0.92),
    "training": (0.15, 0.92),
    "evaluate": (0.92, 0.94),
    "compress": (0.94, 0.97),
    "export": (0.97, 1.00),
}


@dataclass
class StageRecord:
    """One finished training run (baseline or distillation stage), as kept in the checkpoint and results."""

    kind: str  # "baseline" | "distill"
    stage: int  # 0 for the baseline, else the 1-based distillation stage
    ratio: float  # target student params / teacher params
    temperature: float
    alpha: float
    parameters: int
    best_val: float | None  # best validation metric over the epochs
    best_epoch: int
    best_test: float  # test metric of the best-validation epoch
    final_test: float  # test metric of the last epoch
    selected_epoch: int  # the epoch delivered (training_config.select)
    selected_test: float  # its test metric
    history: list[dict[str, Any]]
    state: dict[str, torch.Tensor]  # the delivered weights (the next stage's teacher, or the job's student)
    cache_used: bool
    cache_seconds: float
    seconds: float

    def to_payload(self) -> dict[str, Any]:
        """A plain dict for the checkpoint (tensors shared, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> StageRecord:
        return cls(**{f.name: payload[f.name] for f in fields(cls)})


@dataclass
class JobContext:
    """What every phase of one job reads: spec, adapter, device, callbacks, the engine settings."""

    spec: JobSpec
    adapter: TaskAdapter
    device: torch.device
    callbacks: EngineCallbacks
    stopper: StopChecker
    paths: JobPaths
    engine: EngineConfig
    started: float = field(default_factory=time.monotonic)
    ranks: RankGroup | None = None  # this process is one rank of a multi-process job (world_size > 1)

    def phase(self, name: str, message: str, fraction: float | None = None, **data: Any) -> None:
        """Announce a phase (event + progress at `fraction`, default its table start), then check stop."""
        self.callbacks.on_event("phase", message, {"phase": name, **data})
        start = PROGRESS_TABLE[name][0] if fraction is None else fraction
        self.callbacks.on_progress(Progress(phase=name, fraction=start))
        self.stopper.check(f"before phase {name}")

    def slice_callbacks(self, name: str) -> EngineCallbacks:
        """Callbacks that map a phase's own 0..1 progress into its slice of the job."""
        start, end = PROGRESS_TABLE[name]
        return _PhaseCallbacks(self.callbacks, start, end)

    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        """The task metric on the test split."""
        return self.adapter.evaluate(model, eval_loader(data.test, data), self.device)


@dataclass
class PreparedTeacher:
    model: nn.Module
    metric: float  # on the test split
    parameters: int


@dataclass
class StudentFactory:
    """Where each run's fresh student comes from: derived from the teacher at the run's ratio, or a copy of
    the named student (for the baseline and the last distillation stage; progressive stages before it are
    derived at ratios stepping down to the named student's)."""

    adapter: TaskAdapter
    teacher: nn.Module
    seed: int
    named: BuiltStudent | None
    final_stage: int
    teacher_parameters: int

    @property
    def ratio(self) -> float | None:
        """The named student's parameters / the teacher's (None for a derived student)."""
        if self.named is None:
            return None
        return count_parameters(self.named.model) / self.teacher_parameters

    def build(self, kind: str, stage: int, ratio: float) -> nn.Module:
        """A fresh (untrained) student for one run, on CPU."""
        if self.named is not None and (kind == "baseline" or stage == self.final_stage):
            return copy.deepcopy(self.named.model)
        return self.adapter.build_student(self.teacher, ratio, seed=self.seed)


@dataclass
class Measurements:
    """Size and latency of the teacher and the delivered student, on the job's device."""

    latency: dict[str, dict[str, float]]
    teacher_mb: float
    student_mb: float
    student_parameters: int

    @property
    def speedup(self) -> float:
        return self.latency["teacher"]["batch_64"] / self.latency["student"]["batch_64"]


def training_spans(spec: JobSpec) -> dict[str, tuple[float, float]]:
    """The training slice shared out by expected epochs: "search" (all its trials, if any), then one span
    per seed ("seed-<n>", the delivered seed first), each covering that seed's baseline and stages."""
    config = spec.training_config
    stages = config.num_stages if spec.distillation_method == DistillationMethod.progressive else 1
    per_seed = config.epochs * (stages + (1 if config.baseline else 0))
    seeds = config.seeds or [config.seed]
    search = 0
    if spec.target_retention is not None:
        search = config.max_trials * (config.search_epochs or config.epochs) * stages
    start, end = PROGRESS_TABLE["training"]
    total = search + per_seed * len(seeds)
    spans: dict[str, tuple[float, float]] = {}
    at = start
    for name, work in [("search", search), *((f"seed-{seed}", per_seed) for seed in seeds)]:
        width = (end - start) * work / total
        spans[name] = (at, at + width)
        at += width
    return spans


class _RelabelledCallbacks:
    """A sub-run's callbacks (a search trial, another seed): its progress and events carry `phase` and
    `labels`, the run's own phase kept as `run_phase`, so curves of the delivered run stay apart."""

    def __init__(
        self,
        inner: EngineCallbacks,
        phase: str,
        labels: dict[str, Any],
        prefix: str,
        deadline: float | None = None,
    ) -> None:
        self.inner = inner
        self.phase = phase
        self.labels = labels
        self.prefix = prefix
        self.deadline = deadline  # time.monotonic() past which the run is asked to stop
        self.deadline_passed = False

    def on_progress(self, progress: Progress) -> None:
        self.inner.on_progress(dataclasses.replace(progress, phase=self.phase))

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        labelled = {**data, "run_phase": data.get("phase"), "phase": self.phase, **self.labels}
        self.inner.on_event(kind, f"{self.prefix}: {message}", labelled)

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.deadline_passed = True
            return True
        return self.inner.should_stop()

    def may_write(self) -> bool:
        return self.inner.may_write()


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

    def may_write(self) -> bool:
        return self.inner.may_write()


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
    """A default-registry teacher by name, or a local directory or `.pt2` program (the CLI takes paths)."""
    for source in DEFAULT_TEACHERS:
        if source.name == name_or_path:
            return source
    names = ", ".join(t.name for t in DEFAULT_TEACHERS)
    try:
        path = resolve_path(
            name_or_path, root=None, kind=PathKind.any, what="teacher directory or .pt2 program"
        )
    except PathRefused as exc:
        if exc.code != "path_not_found":
            raise EngineError(exc.code, exc.message) from exc
        raise EngineError(
            "teacher_not_found",
            f"unknown teacher '{name_or_path}': not one of {names}, nor a directory or .pt2 file",
        ) from exc
    if path.is_file() and path.suffix != ".pt2":
        raise EngineError(
            "teacher_not_found",
            f"teacher '{name_or_path}' is a file; a file teacher is a torch.export program (.pt2)",
        )
    return TeacherSource(name=path.name, kind=TeacherSourceKind.local, location=str(path), type="local")


def named_student(
    spec: JobSpec, *, registry: Callable[[str], TeacherSource] | None = None
) -> NamedStudent | None:
    """The spec's student resolved to where it lives; None for 'derived'.

    A 'registry' name is looked up with `registry(name)` (the worker passes its database lookup); by
    default the built-in registry or a directory path (`resolve_teacher`, as the CLI runner does).
    """
    student = spec.student
    if isinstance(student, DerivedStudent):
        return None
    if isinstance(student, RegistryStudent):
        try:
            source = registry(student.name) if registry is not None else resolve_teacher(student.name)
        except EngineError as exc:
            raise EngineError("student_not_found", f"student '{student.name}': {exc.message}") from exc
        return NamedStudent(kind="registry", name=student.name, source=source)
    if student.kind == "hub":
        source = TeacherSource(
            name=student.name, kind=TeacherSourceKind.hub, location=student.name, type="hub"
        )
        return NamedStudent(kind="hub", name=student.name, source=source)
    if student.kind == "local":
        source = TeacherSource(
            name=Path(student.path).name or student.path,
            kind=TeacherSourceKind.local,
            location=student.path,
            type="local",
        )
        return NamedStudent(kind="local", name=student.path, source=source)
    return NamedStudent(kind="config", name="config", overrides=dict(student.overrides))


def build_plans(spec: JobSpec, adapter: TaskAdapter, *, ratio: float | None = None) -> list[RunPlan]:
    """The runs of a job: the optional labels-only baseline, then one stage (or num_stages if progressive).

    `ratio` is the final student's parameter ratio: the named student's when there is one, else
    `spec.target_compression`.
    """
    config = spec.training_config
    final_ratio = ratio if ratio is not None else spec.target_compression
    if final_ratio is None:
        raise EngineError("invalid_spec", "a derived student needs target_compression")
    plans: list[RunPlan] = []
    if config.baseline:
        plans.append(
            RunPlan(
                "baseline",
                0,
                final_ratio,
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
        stage_ratio = final_ratio ** (k / stages)
        weights = adapter.loss_weights(spec, temperature=temperature, alpha=alpha)
        plans.append(RunPlan("distill", k, stage_ratio, temperature, alpha, config.epochs, weights))
    return plans


def kd_gain(*, student: float, baseline: float, higher_is_better: bool) -> tuple[float, str]:
    """KD student vs labels-only baseline, signed so that positive means KD is better, and its unit.

    Accuracy-like metrics: percentage points, 100 * (student - baseline). Lower-is-better metrics
    (perplexity): baseline - student, in the metric's own unit.
    """
    if higher_is_better:
        return 100.0 * (student - baseline), "points"
    return baseline - student, "perplexity"


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


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
    config: EngineConfig | None = None,
    student: NamedStudent | None = None,
    start_from: Path | None = None,
) -> DistillationResults:
    """Run one distillation job end to end; writes artifacts and returns (and stores) its results.

    `student` is the spec's named student already resolved (the worker resolves registry names); None
    resolves it here with `named_student(spec)`. `start_from`: a kept checkpoint (`kept.KEPT_SUFFIX`
    file) of another job to start from, when there is no checkpoint of this job's own to resume: only the
    epochs after it are trained.
    Raises EngineError(code, message) on failures a person can act on, JobStopped when `should_stop()`
    answered True (the last checkpoint is kept). `training_config.world_size` > 1 runs the job on that many
    rank processes (`workers.distill.distributed`); 1 runs it here, in this process.
    """
    callbacks = callbacks or NullCallbacks()
    engine = config or EngineConfig()
    named = student if student is not None else named_student(spec)
    if spec.training_config.world_size > 1:
        from workers.distill.distributed import RankJob, run_distributed

        job = RankJob(
            spec, teacher, paths, data_dir, resume, file_root, trust_remote_code, engine, named, start_from
        )
        return run_distributed(job, callbacks=callbacks)
    results = run_job_rank(
        spec,
        teacher=teacher,
        paths=paths,
        data_dir=data_dir,
        callbacks=callbacks,
        resume=resume,
        file_root=file_root,
        trust_remote_code=trust_remote_code,
        engine=engine,
        named=named,
        ranks=None,
        start_from=start_from,
    )
    assert results is not None  # a single process is rank 0
    return results


def run_job_rank(
    spec: JobSpec,
    *,
    teacher: TeacherSource,
    paths: JobPaths,
    data_dir: Path,
    callbacks: EngineCallbacks,
    resume: bool,
    file_root: Path | None,
    trust_remote_code: bool,
    engine: EngineConfig,
    named: NamedStudent | None,
    ranks: RankGroup | None,
    start_from: Path | None = None,
) -> DistillationResults | None:
    """The job's phases in this process: the whole job (`ranks` None), or one rank's share of it (None
    returned on ranks other than 0, which stop after training)."""
    threads = get_adapter(spec.task).cpu_threads()
    previous_threads = torch.get_num_threads()
    if threads is not None and resolve_device(spec.training_config.device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _run_phases(
            spec,
            teacher=teacher,
            paths=paths,
            data_dir=data_dir,
            callbacks=callbacks,
            resume=resume,
            file_root=file_root,
            trust_remote_code=trust_remote_code,
            engine=engine,
            named=named,
            ranks=ranks,
            start_from=start_from,
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


def _run_phases(
    spec: JobSpec,
    *,
    teacher: TeacherSource,
    paths: JobPaths,
    data_dir: Path,
    callbacks: EngineCallbacks,
    resume: bool,
    file_root: Path | None,
    trust_remote_code: bool,
    engine: EngineConfig,
    named: NamedStudent | None,
    ranks: RankGroup | None = None,
    start_from: Path | None = None,
) -> DistillationResults | None:
    if isinstance(spec.dataset_config, UploadedDataset):
        raise EngineError(
            "dataset_unresolved",
            f"dataset '{spec.dataset_config.dataset_id}' is an upload; "
            "the caller must resolve it to a file dataset first",
        )
    ctx = JobContext(
        spec=spec,
        adapter=get_adapter(spec.task),
        device=resolve_device(spec.training_config.device),
        callbacks=callbacks,
        stopper=StopChecker(callbacks) if ranks is None else ranks.make_stopper(callbacks),
        paths=paths,
        engine=engine,
        ranks=ranks,
    )
    torch.manual_seed(spec.training_config.seed)
    data = load_data(ctx, data_dir=data_dir, file_root=file_root)
    prepared = prepare_teacher(
        ctx, teacher, data, data_dir=data_dir, file_root=file_root, trust_remote_code=trust_remote_code
    )
    students = prepare_student(
        ctx, named, prepared, data, file_root=file_root, trust_remote_code=trust_remote_code
    )
    spans = training_spans(spec)
    train_ctx, searched = ctx, None
    if spec.target_retention is not None:
        searched = search_student_size(ctx, prepared, students, data, resume=resume, span=spans["search"])
        train_ctx = dataclasses.replace(ctx, spec=searched.final_spec)
        torch.manual_seed(spec.training_config.seed)  # the final run as a job of that size would run
    initial_metric, completed, training_seconds = train_stages(
        train_ctx,
        prepared,
        students,
        data,
        resume=resume,
        span=spans[f"seed-{spec.training_config.seed}"],
        start_from=start_from,
        keep_checkpoints=True,
    )
    seed_runs = [
        SeedRun(spec.training_config.seed, completed, training_seconds),
        *train_other_seeds(train_ctx, prepared, students, data, resume=resume, spans=spans),
    ]
    delivered_run = deliver_seed(ctx, seed_runs)
    completed = delivered_run.completed
    if ranks is not None and not ranks.leave_after_training():
        return None  # rank 0 alone measures, compresses, exports and reports
    delivered = [r for r in completed if r.kind == "distill"][-1]
    student = _freeze(_stage_student(ctx, students, delivered))
    measured = measure(ctx, prepared.model, student, data)
    extra = ctx.adapter.compare_with_teacher(prepared.model, student, data, ctx.device)
    extra |= {k: data.info[k] for k in ("teacher_signal_cache", "sequence_kd") if k in data.info}
    extra |= compress(ctx, student, data)
    extra |= export(ctx, student, data)
    extra["splits"] = data.info.get("splits")
    if searched is not None:
        extra |= searched.result_fields(ctx.adapter, prepared, delivered)
    if spec.training_config.seeds is not None:
        extra["seed_summary"] = seed_summary(ctx, prepared, seed_runs, delivered_run.seed)
    return write_results(
        ctx,
        teacher=teacher,
        prepared=prepared,
        initial_metric=initial_metric,
        completed=completed,
        measured=measured,
        extra=extra,
        training_seconds=training_seconds,
        students=students,
    )


def load_data(ctx: JobContext, *, data_dir: Path, file_root: Path | None) -> TaskData:
    """Phase `data`: the job's train/val/test splits."""
    ctx.phase("data", "loading data", device=str(ctx.device))
    return ctx.adapter.load_data(ctx.spec, data_dir=data_dir, file_root=file_root)


def prepare_teacher(
    ctx: JobContext,
    source: TeacherSource,
    data: TaskData,
    *,
    data_dir: Path,
    file_root: Path | None,
    trust_remote_code: bool,
) -> PreparedTeacher:
    """Phase `teacher`: load (build, fine-tune) the teacher, freeze it on the device, measure it on test."""
    ctx.phase("teacher", f"preparing teacher {source.name}")
    model = ctx.adapter.load_teacher(
        source,
        ctx.spec,
        data,
        data_dir=data_dir,
        file_root=file_root,
        device=ctx.device,
        callbacks=ctx.slice_callbacks("teacher"),
        trust_remote_code=trust_remote_code,
    )
    _freeze(model.to(ctx.device))
    ctx.stopper.check("after preparing the teacher")
    metric = ctx.evaluate(model, data)
    parameters = count_parameters(model)
    ctx.callbacks.on_event(
        "phase", "teacher ready", {"phase": "teacher", ctx.adapter.metric: metric, "parameters": parameters}
    )
    return PreparedTeacher(model=model, metric=metric, parameters=parameters)


def prepare_student(
    ctx: JobContext,
    named: NamedStudent | None,
    prepared: PreparedTeacher,
    data: TaskData,
    *,
    file_root: Path | None,
    trust_remote_code: bool,
) -> StudentFactory:
    """The student side (end of phase `teacher`): a named student loaded and checked once, or derivation."""
    config = ctx.spec.training_config
    stages = config.num_stages if ctx.spec.distillation_method == DistillationMethod.progressive else 1
    built: BuiltStudent | None = None
    if named is not None:
        built = ctx.adapter.build_named_student(
            named,
            prepared.model,
            ctx.spec,
            data,
            file_root=file_root,
            trust_remote_code=trust_remote_code,
        )
        built.model.cpu()
    factory = StudentFactory(
        adapter=ctx.adapter,
        teacher=prepared.model,
        seed=config.seed,
        named=built,
        final_stage=stages,
        teacher_parameters=prepared.parameters,
    )
    if built is not None:
        ctx.callbacks.on_event(
            "phase",
            f"student {named.name if named else ''} ready",
            {"phase": "teacher", "student_kind": named.kind if named else "derived", "ratio": factory.ratio},
        )
    ctx.stopper.check("after preparing the student")
    return factory


def _stage_student(ctx: JobContext, students: StudentFactory, record: StageRecord) -> nn.Module:
    """The delivered student of a finished run, rebuilt on the device."""
    model = students.build(record.kind, record.stage, record.ratio)
    model.load_state_dict(record.state)
    return model.to(ctx.device)


def train_stages(
    ctx: JobContext,
    prepared: PreparedTeacher,
    students: StudentFactory,
    data: TaskData,
    *,
    resume: bool,
    span: tuple[float, float] | None = None,
    start_from: Path | None = None,
    keep_checkpoints: bool = False,
) -> tuple[float, list[StageRecord], float]:
    """Phases `baseline` and `distill`: every run of the plan, resumed from the checkpoint when it matches
    (else started from `start_from`, a kept checkpoint of another job, for a single-stage job).

    `span` is the slice of the job's progress these runs cover (default: the whole training slice).
    `keep_checkpoints`: announce kept checkpoints (`kept.KeptCheckpoints`): the job's own run only, not
    search trials or extra seeds, whose folders are their own.
    Returns the fresh student's test metric, the finished runs and the seconds spent training.
    """
    spec, adapter, callbacks = ctx.spec, ctx.adapter, ctx.callbacks
    config = spec.training_config
    plans = build_plans(spec, adapter, ratio=students.ratio)
    checkpoint_path = ctx.paths.checkpoints / CHECKPOINT_FILE
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
        initial_metric = float(saved["initial_student_accuracy"])
        completed = [StageRecord.from_payload(r) for r in saved["completed"]]
        start_index = int(saved["run_index"])
    else:
        final = plans[-1]
        fresh = students.build(final.kind, final.stage, final.ratio)
        initial_metric = ctx.evaluate(fresh.to(ctx.device), data)
        completed = []
        start_index = 0

    parent: StartFrom | None = None
    if saved is None and start_from is not None:
        if [p.kind for p in plans] != ["distill"]:
            raise EngineError(
                "fork_unsupported",
                "a job started from a checkpoint is one distillation stage: no baseline, not progressive",
            )
        parent = StartFrom.load(start_from)
        callbacks.on_event(
            "checkpoint",
            "starting from a parent checkpoint",
            {"epoch": parent.epoch, "stage": parent.stage, "metric": parent.metric},
        )
    kept = (
        None
        if not keep_checkpoints
        else KeptCheckpoints(
            ctx.paths.checkpoints,
            keep=ctx.engine.checkpoint_keep,
            metric=adapter.metric,
            stages=sum(1 for p in plans if p.kind == "distill"),
            callbacks=callbacks,
        )
    )

    steps_per_epoch = -(-len(data.train) // config.batch_size)  # type: ignore[arg-type]
    start, end = span or PROGRESS_TABLE["training"]
    progressor = Progressor(
        callbacks,
        start=start,
        end=end,
        total_steps=sum(p.epochs for p in plans) * steps_per_epoch,
        steps_before=sum(p.epochs for p in plans[:start_index]) * steps_per_epoch,
    )

    def write_checkpoint(run_index: int, run_payload: dict[str, Any] | None) -> None:
        if ctx.ranks is not None and not ctx.ranks.is_main:
            return  # rank 0 writes the job's one checkpoint
        if not callbacks.may_write():
            # The lease is not renewed (database out of reach): another attempt may own the job's folder by
            # now, so this one writes nothing; the next epoch tries again, and a lost lease stops the run.
            logger.warning("checkpoint of run %d skipped: the job's lease is not renewed", run_index)
            return
        if run_payload is not None and kept is not None:
            plan = plans[run_index]
            kept.after_epoch(run_kind=plan.kind, stage=plan.stage, payload=run_payload)
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "spec": spec_json,
                "initial_student_accuracy": initial_metric,
                "run_index": run_index,
                "run": run_payload,
                "completed": [r.to_payload() for r in completed],
            },
        )

    training_started = time.monotonic()
    for index in range(start_index, len(plans)):
        plan = plans[index]
        name = "baseline" if plan.kind == "baseline" else "distill"
        # A run starts where the previous one ended in the training slice, never back at its start.
        ctx.phase(
            name,
            f"{name} stage {plan.stage}: ratio {plan.ratio:.4g}",
            progressor.fraction_done(),
            stage=plan.stage,
        )
        student = students.build(plan.kind, plan.stage, plan.ratio)
        run_teacher: nn.Module | None = None
        if plan.kind == "distill":
            previous = [r for r in completed if r.kind == "distill"]
            # Progressive: each stage is taught by the previous stage's delivered student.
            run_teacher = _freeze(_stage_student(ctx, students, previous[-1])) if previous else prepared.model
        resume_payload = saved["run"] if saved is not None and index == start_index else None
        run_started = time.monotonic()
        state, cache_info = train_run(
            plan=plan,
            student=student,
            teacher=run_teacher,
            adapter=adapter,
            data=data,
            spec=spec,
            device=ctx.device,
            callbacks=callbacks,
            progressor=progressor,
            checkpoint=functools.partial(write_checkpoint, index),
            resume_from=resume_payload,
            stopper=ctx.stopper,
            engine=ctx.engine,
            parallel=ctx.ranks,
            start_from=parent if index == start_index and resume_payload is None else None,
        )
        if ctx.ranks is not None:
            ctx.ranks.check_replicas(student)
        final_metric = ctx.evaluate(student, data)
        final_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        assert state.best_state is not None
        student.load_state_dict(state.best_state)
        best_metric = ctx.evaluate(student, data)
        if config.select == Selection.last:
            selected_epoch, selected_test, delivered_state = plan.epochs, final_metric, final_state
        else:
            selected_epoch, selected_test, delivered_state = state.best_epoch, best_metric, state.best_state
        completed.append(
            StageRecord(
                kind=plan.kind,
                stage=plan.stage,
                ratio=plan.ratio,
                temperature=plan.temperature,
                alpha=plan.alpha,
                parameters=count_parameters(student),
                best_val=state.best_metric,
                best_epoch=state.best_epoch,
                best_test=best_metric,
                final_test=final_metric,
                selected_epoch=selected_epoch,
                selected_test=selected_test,
                history=state.history,
                state=delivered_state,
                cache_used=bool(cache_info["used"]),
                cache_seconds=float(cache_info["seconds"]),
                seconds=time.monotonic() - run_started,
            )
        )
        progressor.steps_before += plan.epochs * steps_per_epoch
        write_checkpoint(index + 1, None)
    return initial_metric, completed, time.monotonic() - training_started


def _variant_spec(spec: JobSpec, ratio: float, **training: Any) -> JobSpec:
    """The spec of one run of a searched or multi-seed job: a derived student of `ratio`, no search."""
    body = spec.model_dump(mode="json")
    body["target_retention"] = None
    body["target_compression"] = ratio
    body["training_config"].update(training)
    return JobSpec.model_validate(body)


def _validation_metric(record: StageRecord) -> float:
    """The delivered epoch's validation metric of a finished run."""
    return float(record.history[record.selected_epoch - 1]["student_accuracy"])


@dataclass
class SearchedSize:
    """The search phase's outcome: the trials, the size chosen and the spec that trains it fully."""

    outcome: SearchOutcome
    settings: SearchSettings
    final_spec: JobSpec
    teacher_validation: float
    trial_epochs: int
    trials_exact: bool

    def result_fields(
        self, adapter: TaskAdapter, prepared: PreparedTeacher, delivered: StageRecord
    ) -> dict[str, Any]:
        """results.target_retention / target_met / search / trials, judged on the delivered student."""
        retention = adapter.retention(prepared.metric, delivered.selected_test)
        chosen = self.outcome.chosen
        return {
            "target_retention": self.settings.target,
            "target_met": retention >= self.settings.target,
            "trials": [t.record for t in self.outcome.trials],
            "search": {
                "target_retention": self.settings.target,
                "status": self.outcome.status,
                "decided_on": "validation",
                "trial_epochs": self.trial_epochs,
                "trials_exact": self.trials_exact,
                "teacher_validation_accuracy": self.teacher_validation,
                "chosen_trial": chosen.record["trial"] if chosen else None,
                "chosen_compression_ratio": self.final_spec.target_compression,
                "bracket": list(self.outcome.bracket),
                "tolerance": self.settings.tolerance,
                "max_trials": self.settings.max_trials,
                "max_search_seconds": self.settings.max_seconds,
                "trials_used": len(self.outcome.trials),
                "seconds": self.outcome.seconds,
                "final_validation_retention": adapter.retention(
                    self.teacher_validation, _validation_metric(delivered)
                ),
            },
        }


def search_student_size(
    ctx: JobContext,
    prepared: PreparedTeacher,
    students: StudentFactory,
    data: TaskData,
    *,
    resume: bool,
    span: tuple[float, float],
) -> SearchedSize:
    """Phase `search`: train derived students of the sizes `search.run_search` picks, each a short job of
    its own (the spec's method and stages, no baseline, `search_epochs` epochs, its own checkpoint), and
    measure each on validation (decides), test (reported) and latency. Resumable: finished trials are
    kept in `search/state.json`, an unfinished one resumes from its checkpoint."""
    spec, adapter = ctx.spec, ctx.adapter
    config = spec.training_config
    assert spec.target_retention is not None
    settings = SearchSettings(
        target=spec.target_retention,
        max_trials=config.max_trials,
        max_seconds=config.max_search_seconds,
        tolerance=config.search_tolerance,
    )
    trial_epochs = config.search_epochs or config.epochs
    ctx.phase("search", f"searching the smallest student keeping {settings.target:g} of the teacher")
    teacher_validation = adapter.evaluate(prepared.model, eval_loader(data.val, data), ctx.device)
    search_dir = ctx.paths.work_dir / "search"
    state_path = search_dir / "state.json"
    spec_json = spec.model_dump(mode="json")
    done: list[Trial] = []
    seconds_before = 0.0
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("spec") == spec_json:
            done = [
                Trial(
                    r["compression_ratio"],
                    r["parameters"],
                    r["validation_retention"],
                    r,
                    counted=not str(r.get("error") or "").startswith("cut short"),
                )
                for r in state["trials"]
            ]
            seconds_before = float(state["seconds"])
    counted: dict[float, int] = {}

    def parameters_at(ratio: float) -> int:
        if ratio not in counted:
            try:
                counted[ratio] = count_parameters(
                    adapter.build_student(prepared.model, ratio, seed=config.seed)
                )
            except EngineError:
                counted[ratio] = -1  # not buildable: the probe records why
        return counted[ratio]

    start, end = span
    width = (end - start) / settings.max_trials
    deadline = time.monotonic() - seconds_before + settings.max_seconds

    def probe(number: int, ratio: float) -> Trial:
        started = time.monotonic()
        record: dict[str, Any] = {"trial": number, "compression_ratio": ratio, "epochs": trial_epochs}
        try:
            parameters = count_parameters(adapter.build_student(prepared.model, ratio, seed=config.seed))
        except EngineError as exc:
            record |= {"parameters": 0, "meets_target": False, "error": exc.message}
            record |= {"validation_retention": None, "seconds": time.monotonic() - started}
            return Trial(ratio, 0, None, record)
        callbacks = _RelabelledCallbacks(
            ctx.callbacks, "search", {"trial": number}, f"trial {number}", deadline=deadline
        )
        trial_ctx = dataclasses.replace(
            ctx,
            spec=_variant_spec(spec, ratio, baseline=False, epochs=trial_epochs, seeds=None),
            paths=JobPaths(search_dir / f"trial-{number}"),
            callbacks=callbacks,
            stopper=StopChecker(callbacks),
        )
        torch.manual_seed(config.seed)
        trial_span = (start + (number - 1) * width, start + number * width)
        try:
            _, completed, _ = train_stages(
                trial_ctx, prepared, students, data, resume=resume, span=trial_span
            )
        except JobStopped:
            if not callbacks.deadline_passed or ctx.callbacks.should_stop():
                raise  # a cancel: the trial's checkpoint is kept for the resume
            shutil.rmtree(trial_ctx.paths.work_dir, ignore_errors=True)
            record |= {
                "parameters": parameters,
                "meets_target": False,
                "validation_retention": None,
                "error": f"cut short at max_search_seconds ({settings.max_seconds:g} s); not counted",
                "seconds": time.monotonic() - started,
            }
            return Trial(ratio, parameters, None, record, counted=False)
        delivered = [r for r in completed if r.kind == "distill"][-1]
        model = _freeze(_stage_student(ctx, students, delivered))
        latency = {}
        for batch_size in (1, 64):
            ctx.stopper.check("while timing a trial")
            batch = adapter.example_batch(data, batch_size)
            latency[f"batch_{batch_size}"] = measure_latency_ms(adapter, model, batch, ctx.device)
        validation = _validation_metric(delivered)
        retention = adapter.retention(teacher_validation, validation)
        record |= {
            "parameters": parameters,
            "validation_accuracy": validation,
            "validation_retention": retention,
            "test_accuracy": delivered.selected_test,
            "test_retention": adapter.retention(prepared.metric, delivered.selected_test),
            "meets_target": retention >= settings.target,
            "latency_ms": latency,
            "seconds": time.monotonic() - started,
        }
        shutil.rmtree(trial_ctx.paths.work_dir, ignore_errors=True)  # its record is all that is kept
        return Trial(ratio, parameters, retention, record)

    def on_trial(trial: Trial, trials: list[Trial]) -> None:
        record = trial.record
        retention = record.get("validation_retention")
        verdict = "meets" if record["meets_target"] else "misses"
        ctx.callbacks.on_event(
            "trial",
            f"trial {record['trial']}: ratio {trial.ratio:.4g}, {trial.parameters:,} parameters, "
            + (
                f"validation retention {retention:.4f} {verdict} {settings.target:g}"
                if retention is not None
                else f"not buildable: {record.get('error')}"
            ),
            {"phase": "search", **record},
        )
        if not ctx.callbacks.may_write():  # as an epoch checkpoint: a later trial's write tries again
            logger.warning(
                "search state after trial %s skipped: the job's lease is not renewed", record["trial"]
            )
            return
        search_dir.mkdir(parents=True, exist_ok=True)
        elapsed = seconds_before + sum(float(t.record["seconds"]) for t in trials[len(done) :])
        payload = {"spec": spec_json, "trials": [t.record for t in trials], "seconds": elapsed}
        state_path.write_text(json.dumps(payload), encoding="utf-8")

    outcome = run_search(
        settings,
        probe=probe,
        parameters_at=parameters_at,
        done=done,
        on_trial=on_trial,
        check_stop=lambda: ctx.stopper.check("between search trials"),
        seconds_before=seconds_before,
    )
    # Nothing finished within the budget: the first size it started is trained fully (target_met says
    # whether it keeps the target; the search vouches for nothing).
    chosen = outcome.chosen or next((t for t in outcome.trials if t.parameters > 0), None)
    if chosen is None:
        raise EngineError(
            "search_failed", "no student could be built at any size the search tried; see the trial events"
        )
    ctx.callbacks.on_event(
        "phase",
        f"search {outcome.status}: training ratio {chosen.ratio:.4g} "
        f"({chosen.parameters:,} parameters) fully",
        {
            "phase": "search",
            "status": outcome.status,
            "chosen_trial": chosen.record["trial"],
            "compression_ratio": chosen.ratio,
            "trials": len(outcome.trials),
        },
    )
    return SearchedSize(
        outcome=outcome,
        settings=settings,
        final_spec=_variant_spec(spec, chosen.ratio),
        teacher_validation=teacher_validation,
        trial_epochs=trial_epochs,
        trials_exact=trial_epochs == config.epochs,
    )


@dataclass
class SeedRun:
    """Another seed's finished runs (the delivered seed's are the job's own `completed`)."""

    seed: int
    completed: list[StageRecord]
    seconds: float


def train_other_seeds(
    ctx: JobContext,
    prepared: PreparedTeacher,
    students: StudentFactory,
    data: TaskData,
    *,
    resume: bool,
    spans: dict[str, tuple[float, float]],
) -> list[SeedRun]:
    """`training_config.seeds` after the first: the same runs (baseline included) once per seed, each with
    its own checkpoint under `seeds/seed-<n>`, so the spread of the figures can be reported."""
    spec = ctx.spec
    runs: list[SeedRun] = []
    for seed in (spec.training_config.seeds or [])[1:]:
        seed_ctx = dataclasses.replace(
            ctx,
            spec=_variant_spec(spec, float(spec.target_compression or 0.0), seed=seed, seeds=None)
            if students.named is None
            else spec.model_copy(
                update={
                    "training_config": spec.training_config.model_copy(update={"seed": seed, "seeds": None})
                }
            ),
            paths=JobPaths(ctx.paths.work_dir / "seeds" / f"seed-{seed}"),
            callbacks=_RelabelledCallbacks(ctx.callbacks, "seeds", {"seed": seed}, f"seed {seed}"),
        )
        torch.manual_seed(seed)
        _, completed, seconds = train_stages(
            seed_ctx,
            prepared,
            dataclasses.replace(students, seed=seed),
            data,
            resume=resume,
            span=spans[f"seed-{seed}"],
        )
        runs.append(SeedRun(seed=seed, completed=completed, seconds=seconds))
    return runs


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def deliver_seed(ctx: JobContext, runs: list[SeedRun]) -> SeedRun:
    """The seed whose student is delivered: the first, or (seed_select best_validation) the one whose
    delivered epoch scored best on validation (the first among equals)."""
    if ctx.spec.training_config.seed_select == "first" or len(runs) == 1:
        return runs[0]
    sign = 1.0 if ctx.adapter.higher_is_better else -1.0

    def validation(run: SeedRun) -> float:
        return sign * _validation_metric([r for r in run.completed if r.kind == "distill"][-1])

    best = max(validation(run) for run in runs)
    return next(run for run in runs if validation(run) == best)


def seed_summary(
    ctx: JobContext, prepared: PreparedTeacher, runs: list[SeedRun], delivered_seed: int
) -> dict[str, Any]:
    """results.seed_summary: per-seed test figures of the delivered-epoch students and their spread."""
    adapter = ctx.adapter
    per_seed: list[dict[str, Any]] = []
    for run in runs:
        delivered = [r for r in run.completed if r.kind == "distill"][-1]
        baseline = next((r for r in run.completed if r.kind == "baseline"), None)
        entry: dict[str, Any] = {
            "seed": run.seed,
            "student_accuracy": delivered.selected_test,
            "accuracy_retention": adapter.retention(prepared.metric, delivered.selected_test),
            "validation_accuracy": _validation_metric(delivered),
            "parameters": delivered.parameters,
            "seconds": run.seconds,
        }
        if baseline is not None:
            entry["baseline_accuracy"] = baseline.selected_test
            entry["kd_gain"] = kd_gain(
                student=delivered.selected_test,
                baseline=baseline.selected_test,
                higher_is_better=adapter.higher_is_better,
            )[0]
        per_seed.append(entry)
    summary: dict[str, Any] = {
        "seeds": [run.seed for run in runs],
        "delivered_seed": delivered_seed,
        "delivered_by": "first_seed"
        if ctx.spec.training_config.seed_select == "first"
        else "best_validation",
        "per_seed": per_seed,
    }
    for name in ("student_accuracy", "accuracy_retention", "baseline_accuracy", "kd_gain"):
        values = [float(e[name]) for e in per_seed if name in e]
        summary[name] = _spread(values) if values else None
    return summary


def measure(ctx: JobContext, teacher: nn.Module, student: nn.Module, data: TaskData) -> Measurements:
    """Phase `evaluate`: latency at batch 1 and 64 and the stored size of the teacher and the student."""
    ctx.phase("evaluate", "measuring teacher and student")
    latency: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    for batch_size in (1, 64):
        batch = ctx.adapter.example_batch(data, batch_size)
        for role, model in (("teacher", teacher), ("student", student)):
            ctx.stopper.check("while measuring latency")
            latency[role][f"batch_{batch_size}"] = measure_latency_ms(ctx.adapter, model, batch, ctx.device)
    return Measurements(
        latency=latency,
        teacher_mb=model_size_mb(teacher),
        student_mb=model_size_mb(student),
        student_parameters=count_parameters(student),
    )


def compress(ctx: JobContext, student: nn.Module, data: TaskData) -> dict[str, Any]:
    """Phase `compress`: the spec's pruning (in place) and int8 copy, each stage re-measured."""
    ctx.phase("compress", "post-training steps")
    await_write(ctx.callbacks, "the compressed students", timeout_s=ctx.engine.write_wait_s)
    return compress_student(
        student,
        ctx.adapter,
        data,
        ctx.spec,
        out_dir=ctx.paths.artifacts,
        device=ctx.device,
        callbacks=ctx.slice_callbacks("compress"),
    )


def export(ctx: JobContext, student: nn.Module, data: TaskData) -> dict[str, Any]:
    """Phase `export`: the student's weights and config, its `torch.export` program, the task's extras."""
    ctx.phase("export", "writing artifacts")
    await_write(ctx.callbacks, "the artifacts", timeout_s=ctx.engine.write_wait_s)
    ctx.paths.artifacts.mkdir(parents=True, exist_ok=True)
    extra = ctx.adapter.export_extras(student, ctx.paths.artifacts, data, ctx.callbacks)
    ctx.adapter.save_student(student, ctx.paths.artifacts, data)
    ctx.adapter.export_program(student, ctx.paths.artifacts / ARTIFACT_EXPORT, data)
    return extra


def write_results(
    ctx: JobContext,
    *,
    teacher: TeacherSource,
    prepared: PreparedTeacher,
    initial_metric: float,
    completed: list[StageRecord],
    measured: Measurements,
    extra: dict[str, Any],
    training_seconds: float,
    students: StudentFactory,
) -> DistillationResults:
    """The results of the delivered student: stored as results.json, announced, returned."""
    spec, adapter = ctx.spec, ctx.adapter
    distilled = [r for r in completed if r.kind == "distill"]
    delivered = distilled[-1]
    baseline = next((r for r in completed if r.kind == "baseline"), None)
    student_metric = float(delivered.selected_test)
    gain, gain_unit = (
        kd_gain(
            student=student_metric,
            baseline=float(baseline.selected_test),
            higher_is_better=adapter.higher_is_better,
        )
        if baseline
        else (None, None)
    )
    ratio = measured.student_parameters / prepared.parameters
    speedup = measured.speedup
    history = [
        {k: v for k, v in entry.items() if k != "losses"} | {"losses": entry.get("losses", {})}
        for record in distilled
        for entry in record.history
    ]
    results = DistillationResults(
        task=str(spec.task),
        metric=adapter.metric,
        metric_direction="higher_is_better" if adapter.higher_is_better else "lower_is_better",
        metric_split="test",
        device=str(ctx.device),
        teacher_name=teacher.name,
        distillation_method=str(spec.distillation_method),
        teacher_accuracy=prepared.metric,
        initial_student_accuracy=initial_metric,
        student_accuracy=student_metric,
        selected_by=str(spec.training_config.select),
        selected_epoch=delivered.selected_epoch,
        final_student_accuracy=float(delivered.final_test),
        best_student_accuracy=float(delivered.best_test),
        accuracy_retention=adapter.retention(prepared.metric, student_metric),
        original_parameters=prepared.parameters,
        compressed_parameters=measured.student_parameters,
        compression_ratio=ratio,
        target_compression=spec.target_compression,
        student={
            "kind": str(spec.student.kind),
            **(students.named.notes if students.named is not None else {}),
            "parameters": measured.student_parameters,
            "compression_ratio": ratio,
        },
        parameter_reduction=1.0 - ratio,
        model_size_mb={"teacher": measured.teacher_mb, "student": measured.student_mb},
        memory_savings=1.0 - measured.student_mb / measured.teacher_mb,
        latency_ms=measured.latency,
        inference_speedup=speedup,
        cost_savings=1.0 - 1.0 / speedup,
        training_history=history,
        stages=[
            {
                "stage": r.stage,
                "compression_ratio": r.parameters / prepared.parameters,
                "parameters": r.parameters,
                "best_student_accuracy": r.best_test,
                "student_accuracy": r.selected_test,
                "selected_epoch": r.selected_epoch,
                "temperature": r.temperature,
                "alpha": r.alpha,
                "best_epoch": r.best_epoch,
                "teacher_cache_used": r.cache_used,
                "cache_seconds": r.cache_seconds,
                "seconds": r.seconds,
            }
            for r in distilled
        ],
        baseline_accuracy=baseline.selected_test if baseline else None,
        kd_gain=gain,
        kd_gain_unit=gain_unit,
        baseline_history=baseline.history if baseline else None,
        teacher_cache_used=all(r.cache_used for r in distilled),
        training_seconds=training_seconds,
        total_seconds=time.monotonic() - ctx.started,
        **extra,
    )
    await_write(ctx.callbacks, "results.json", timeout_s=ctx.engine.write_wait_s)
    (ctx.paths.artifacts / ARTIFACT_RESULTS).write_text(results.model_dump_json(indent=2), encoding="utf-8")
    ctx.callbacks.on_event(
        "phase",
        "done",
        {
            "phase": "done",
            "student_accuracy": student_metric,
            "best_student_accuracy": delivered.best_test,
            "retention": results.accuracy_retention,
        },
    )
    ctx.callbacks.on_progress(Progress(phase="done", fraction=1.0, eta_seconds=0.0))
    return results


def read_results(paths: JobPaths) -> dict[str, Any]:
    """The stored results.json of a finished job."""
    results: dict[str, Any] = json.loads((paths.artifacts / ARTIFACT_RESULTS).read_text(encoding="utf-8"))
    return results
