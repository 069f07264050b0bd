"""Estimates before launch: model and dataset sizes, a FLOP count, and the expected training seconds.

A job's work is counted as FLOPs (the usual 6·P per trained example for the student's forward and backward
pass, 2·P for a teacher forward pass: once per example when its outputs are cached, every epoch otherwise;
2·P per validation example), optimizer steps and epochs. With at least three finished jobs of the same task
and device type (preferring teachers of similar size, within 3x) the training seconds are fitted on those
(non-negative coefficients, least relative error: small models are dominated by per-step overhead, not
FLOPs); with one or two, FLOPs are divided by their median measured FLOP/s; with none, by
ESTIMATE_DEFAULT_FLOPS_PER_SECOND. `basis` says which. Each completed job stores what it measured
(`estimate.actual`), so history costs one small read.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ESTIMATE_HISTORY_WHERE
from app.schemas.job_spec import (
    BuiltinDataset,
    Device,
    DistillationMethod,
    FileDataset,
    JobSpec,
    Task,
    TeacherCache,
    UploadedDataset,
)
from app.services import datasets as datasets_service
from app.services import teachers as teachers_service

# scikit-learn's digits: 1797 examples; the engine keeps 20 % for test, then 10 % of the rest for validation.
_DIGITS_ROWS = 1797
_TEST_FRACTION = 0.2
_VALIDATION_FRACTION = 0.1
# Finished jobs read for throughput (their `estimate` column only).
_HISTORY_JOBS = 200
# "Similar size": teacher parameter counts within this factor.
_SIZE_FACTOR = 3.0
# How a fitted coefficient is shown in `basis`.
_UNITS: dict[str, tuple[str, Any]] = {
    "flops": ("s per TFLOP", lambda c: f"{c * 1e12:.3g}"),
    "steps": ("ms per optimizer step", lambda c: f"{c * 1e3:.3g}"),
    "epochs": ("ms per epoch", lambda c: f"{c * 1e3:.3g}"),
}
# Line counting for `file` datasets stops here (a bigger file is estimated from its size).
_COUNT_LINES_MAX_BYTES = 64 * 1024 * 1024


def _dataset_rows(session: Session | None, spec: JobSpec, tenant_id: str | None) -> tuple[int | None, str]:
    """Examples in the whole dataset and where the number comes from (`session`: for uploads only)."""
    dataset = spec.dataset_config
    if isinstance(dataset, BuiltinDataset):
        return _DIGITS_ROWS, "builtin digits"
    if isinstance(dataset, UploadedDataset):
        assert session is not None
        uploaded = datasets_service.get(session, dataset_id=dataset.dataset_id, tenant_id=tenant_id)
        return (uploaded.num_rows, "uploaded dataset") if uploaded else (None, "unknown upload")
    if isinstance(dataset, FileDataset):
        path = Path(dataset.path)
        try:
            if path.stat().st_size > _COUNT_LINES_MAX_BYTES:
                return None, "file too large to count"
            with path.open("rb") as handle:
                lines = sum(1 for line in handle if line.strip())
        except OSError as exc:
            return None, f"file not readable ({exc.strerror})"
        header = 1 if path.suffix.lower() == ".csv" else 0
        return max(0, lines - header), "file lines"
    return None, "hub dataset (size unknown before download)"


def _device_type(session: Session, spec: JobSpec) -> str:
    """The device the job will train on: asked for, or (auto) cuda when a worker's heartbeat offers GPUs."""
    if spec.training_config.device != Device.auto:
        return device_for(spec, any_gpu_worker=False)
    return device_for(spec, any_gpu_worker=bool(session.scalar(text(f"SELECT {ANY_GPU_WORKER_SQL}"))))


def _history(session: Session) -> list[dict[str, Any]]:
    """`estimate` of recent completed jobs that measured their throughput."""
    # The predicate as literal SQL, so that the planner always matches the partial index to it.
    rows = session.scalars(text(HISTORY_SQL).columns(estimate=JSON)).all()
    return usable_history(rows)


def training_flops(
    spec: JobSpec,
    *,
    teacher_params: int,
    ratio: float,
    train_rows: int,
    val_rows: int,
    start_epoch: int = 0,
) -> tuple[float, list[dict[str, Any]]]:
    """FLOPs of every training run of the job (baseline, stages) and their breakdown, for a student of
    `ratio` x the teacher's parameters; a job started from a checkpoint at `start_epoch` trains only the
    epochs after it."""
    config = spec.training_config
    epochs = max(0, config.epochs - start_epoch)
    # Sequence tasks: per token; max_seq_length is an upper bound on tokens per example.
    tokens = 1 if spec.task == Task.classification else config.max_seq_length
    examples, val_examples = train_rows * tokens, val_rows * tokens
    cached = config.teacher_cache != TeacherCache.off
    stages = config.num_stages if spec.distillation_method == DistillationMethod.progressive else 1
    runs: list[dict[str, Any]] = []
    if config.baseline:
        student = teacher_params * ratio
        runs.append({"run": "baseline", "student_parameters": round(student), "teacher_parameters": 0})
    previous = float(teacher_params)
    for k in range(1, stages + 1):
        student = teacher_params * ratio ** (k / stages)
        runs.append(
            {"run": f"stage {k}", "student_parameters": round(student), "teacher_parameters": round(previous)}
        )
        previous = student
    total = 0.0
    for run in runs:
        student, teacher = run["student_parameters"], run["teacher_parameters"]
        teacher_passes = 1 if cached else epochs
        flops = epochs * (6 * student * examples + 2 * student * val_examples)
        flops += teacher_passes * 2 * teacher * examples
        run["flops"] = float(flops)
        total += flops
    return total, runs


def work_features(
    spec: JobSpec, *, flops: float, runs: int, train_rows: int, start_epoch: int = 0
) -> dict[str, float]:
    """What a job's training time is fitted on: FLOPs, optimizer steps (per-step overhead dominates small
    models) and epochs (each ends with a validation pass and a checkpoint)."""
    config = spec.training_config
    epochs = max(0, config.epochs - start_epoch) * runs
    return {
        "flops": flops,
        "steps": float(epochs * -(-train_rows // config.batch_size)),
        "epochs": float(epochs),
    }


_FEATURES = ("flops", "steps", "epochs")


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(vector)
    a = [[*row, vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit_seconds(samples: list[tuple[dict[str, float], float]]) -> tuple[dict[str, float], list[float]] | None:
    """Seconds = sum(coefficient x feature) with every coefficient >= 0, fitted on relative error (each
    job's actual/predicted counts alike); the best subset of features. Returns (coefficients, the fit's
    actual/predicted ratios) or None with too few jobs."""
    best: tuple[float, dict[str, float], list[float]] | None = None
    for size in (1, 2, 3):
        for subset in itertools.combinations(_FEATURES, size):
            if len(samples) < size + 2:
                continue
            # Rows x_i / y_i against target 1: least squares on relative error.
            rows = [[f[k] / y for k in subset] for f, y in samples]
            # Columns scaled to mean 1 (FLOPs ~1e10, epochs ~10) so the normal equations are well posed.
            scales = [sum(r[i] for r in rows) / len(rows) or 1.0 for i in range(size)]
            rows = [[r[i] / scales[i] for i in range(size)] for r in rows]
            gram = [[sum(r[i] * r[j] for r in rows) for j in range(size)] for i in range(size)]
            rhs = [sum(r[i] for r in rows) for i in range(size)]
            solution = _solve(gram, rhs)
            if solution is None or any(c <= 0 for c in solution):
                continue
            coefficients = {k: c / scales[i] for i, (k, c) in enumerate(zip(subset, solution, strict=True))}
            ratios = [y / sum(coefficients[k] * f[k] for k in subset) for f, y in samples]
            error = sum((1 / r - 1) ** 2 for r in ratios)
            if best is None or error < best[0]:
                best = (error, coefficients, ratios)
    return None if best is None else (best[1], best[2])


def estimate(
    session: Session, *, spec: JobSpec, tenant_id: str | None, settings: Settings, start_epoch: int = 0
) -> dict[str, Any]:
    """Sizes, FLOPs and expected training seconds of `spec` (started from a checkpoint at `start_epoch`:
    only the later epochs), with the basis stated."""
    history = _history(session)
    teacher = teachers_service.get(session, name=spec.teacher_model_name, tenant_id=tenant_id)
    return compute(
        spec,
        history=history,
        registered_teacher_params=teacher.params if teacher is not None else None,
        dataset_rows=_dataset_rows(session, spec, tenant_id),
        device=_device_type(session, spec),
        settings=settings,
        start_epoch=start_epoch,
    )


# ------------------------------------------------------------------ the create's estimate, on the event loop
# The one-statement create (app.services.jobs.create_pending_async) makes the estimate without a session:
# from the registered teacher size, whether a worker has GPUs, and the history of finished jobs, all three
# read by the create's own statement. The history (up to 200 rows of JSON) is kept in memory per version:
# the finished_at of the newest completed job, which changes whenever another one completes.

# Both served by the partial index ix_jobs_estimate_history (its predicate, word for word).
HISTORY_VERSION_SQL = f"SELECT max(finished_at) FROM jobs WHERE {ESTIMATE_HISTORY_WHERE}"
HISTORY_SQL = (
    f"SELECT estimate FROM jobs WHERE {ESTIMATE_HISTORY_WHERE} "
    f"ORDER BY finished_at DESC LIMIT {_HISTORY_JOBS}"
)
# Whether a worker's heartbeat offers GPUs (CUDA_VISIBLE_DEVICES set, and not to "-1" or "none"): read by
# `_device_type` and by the one-statement create's own statement.
ANY_GPU_WORKER_SQL = (
    "EXISTS (SELECT 1 FROM service_heartbeats WHERE kind = 'worker' "
    "AND coalesce(info->>'cuda_visible_devices', '') NOT IN ('', '-1', 'none'))"
)


def usable_history(estimates: Iterable[Any]) -> list[dict[str, Any]]:
    """The stored estimates that carry a measured `actual` (what `_history` keeps)."""
    return [r for r in estimates if isinstance(r, dict) and isinstance(r.get("actual"), dict)]


def device_for(spec: JobSpec, *, any_gpu_worker: bool) -> str:
    """The device a job trains on: the one asked for, or (auto) cuda when a worker offers GPUs."""
    requested = spec.training_config.device
    if requested != Device.auto:
        return str(requested)
    return "cuda" if any_gpu_worker else "cpu"


def dataset_rows_without_lookup(spec: JobSpec) -> tuple[int | None, str]:
    """`_dataset_rows` of a dataset that needs no database read (builtin, hub): the one-statement create's."""
    if isinstance(spec.dataset_config, UploadedDataset):
        raise ValueError("an uploaded dataset's size is read from the database")
    return _dataset_rows(None, spec, None)


def compute(
    spec: JobSpec,
    *,
    history: list[dict[str, Any]],
    registered_teacher_params: int | None,
    dataset_rows: tuple[int | None, str],
    device: str,
    settings: Settings,
    start_epoch: int = 0,
) -> dict[str, Any]:
    """The estimate of `spec` from what was read: no I/O (the sync and the event-loop paths share it)."""
    # The registry's count: given at registration, or measured by the teacher's first finished job
    # (`teachers.record_measured_params`). Never looked up by name in the history: names are per tenant.
    teacher_params = registered_teacher_params or None
    params_source = "registry"
    rows, rows_source = dataset_rows
    result: dict[str, Any] = {
        "task": str(spec.task),
        "device_type": device,
        "teacher_model_name": spec.teacher_model_name,
        "teacher_parameters": teacher_params,
        "student_parameters": (
            round(teacher_params * spec.target_compression)
            if teacher_params and spec.target_compression
            else None
        ),
        "dataset_rows": rows,
        "train_rows": None,
        "val_rows": None,
        "flops": None,
        "expected_training_seconds": None,
        "expected_training_seconds_range": None,
        "flops_per_second": None,
        "history_jobs": 0,
        "start_epoch": start_epoch,
        "basis": "",
    }
    if rows is not None:
        rest = rows - round(rows * _TEST_FRACTION)
        result["val_rows"] = round(rest * _VALIDATION_FRACTION)
        result["train_rows"] = rest - result["val_rows"]
    missing = []
    if teacher_params is None:
        missing.append(
            f"the parameter count of teacher '{spec.teacher_model_name}' (none registered or measured)"
        )
    if spec.target_compression is None:
        missing.append("the student's size (a named student: known once its first job built it)")
    if rows is None:
        missing.append(f"the dataset's size ({rows_source})")
    if missing:
        result["basis"] = "no estimate: unknown " + " and ".join(missing)
        return result
    assert teacher_params is not None and spec.target_compression is not None
    flops, runs = training_flops(
        spec,
        teacher_params=teacher_params,
        ratio=spec.target_compression,
        train_rows=result["train_rows"],
        val_rows=result["val_rows"],
        start_epoch=start_epoch,
    )
    features = work_features(
        spec, flops=flops, runs=len(runs), train_rows=result["train_rows"], start_epoch=start_epoch
    )
    result |= {"flops": flops, "runs": runs, "features": features, "parameters_source": params_source}

    same_kind = [
        h for h in history if h.get("task") == str(spec.task) and h["actual"].get("device_type") == device
    ]
    similar = [
        h
        for h in same_kind
        if h["actual"].get("teacher_parameters")
        and abs(math.log(h["actual"]["teacher_parameters"] / teacher_params)) <= math.log(_SIZE_FACTOR)
    ]
    chosen, scope = (
        (similar, "same task, device type and teacher size (within 3x)")
        if similar
        else (
            same_kind,
            "same task and device type (no teacher of similar size yet)",
        )
    )
    samples = [
        (h["actual"]["features"], float(h["actual"]["training_seconds"]))
        for h in chosen
        if h["actual"].get("features") and h["actual"].get("training_seconds", 0) > 0
    ]
    fitted = fit_seconds(samples)
    if fitted is not None:
        coefficients, ratios = fitted
        expected = sum(c * features[k] for k, c in coefficients.items())
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        terms = ", ".join(f"{_UNITS[k][1](c)} {_UNITS[k][0]}" for k, c in coefficients.items())
        result |= {
            "flops_per_second": flops / expected,
            "expected_training_seconds": expected,
            "expected_training_seconds_range": [expected * q1, expected * q3],
            "history_jobs": len(samples),
            "model": coefficients,
            "basis": f"fitted on the measured training seconds of {len(samples)} finished jobs ({scope}): "
            f"{terms}",
        }
        return result
    rates = [float(h["actual"]["flops_per_second"]) for h in chosen if h["actual"].get("flops_per_second")]
    if not rates:
        rate = settings.estimate_default_flops_per_second
        result |= {
            "flops_per_second": rate,
            "expected_training_seconds": flops / rate,
            "basis": f"no history: FLOP count only ({flops:.3g} FLOPs at the assumed {rate:.3g} FLOP/s, "
            "ESTIMATE_DEFAULT_FLOPS_PER_SECOND)",
        }
        return result
    rate = statistics.median(rates)
    low, high = (min(rates), max(rates)) if len(rates) < 4 else statistics.quantiles(rates, n=4)[::2]
    result |= {
        "flops_per_second": rate,
        "expected_training_seconds": flops / rate,
        "expected_training_seconds_range": [flops / high, flops / low],
        "history_jobs": len(rates),
        "basis": f"median training throughput of {len(rates)} finished job{'s' if len(rates) != 1 else ''} "
        f"({scope}): {rate:.3g} FLOP/s",
    }
    return result


def measured(
    spec: JobSpec, estimate: dict[str, Any] | None, results: dict[str, Any]
) -> dict[str, Any] | None:
    """The estimate with what the finished job measured (`actual`), or None without an estimate.

    The throughput is the job's FLOP count with its measured teacher size over its training seconds, so
    a teacher of unknown size is known from its first finished job on (the worker also stores the measured
    size on the teacher: `teachers.record_measured_params`).
    """
    if not estimate:
        return None
    seconds = float(results.get("training_seconds") or 0.0)
    teacher_params = results.get("original_parameters")
    actual: dict[str, Any] = {
        "training_seconds": seconds,
        "device_type": str(results.get("device", "")).split(":")[0] or None,
        "teacher_parameters": teacher_params,
        "student_parameters": results.get("compressed_parameters"),
    }
    student_params = results.get("compressed_parameters")
    if teacher_params and student_params and estimate.get("train_rows") is not None and seconds > 0:
        flops, runs = training_flops(
            spec,
            teacher_params=int(teacher_params),
            ratio=float(student_params) / float(teacher_params),
            train_rows=int(estimate["train_rows"]),
            val_rows=int(estimate.get("val_rows") or 0),
            start_epoch=int(estimate.get("start_epoch") or 0),
        )
        actual["flops"] = flops
        actual["flops_per_second"] = flops / seconds
        actual["features"] = work_features(
            spec,
            flops=flops,
            runs=len(runs),
            train_rows=int(estimate["train_rows"]),
            start_epoch=int(estimate.get("start_epoch") or 0),
        )
    expected = estimate.get("expected_training_seconds")
    if expected and seconds > 0:
        actual["ratio"] = seconds / float(expected)  # actual / expected: 1 is exact, >1 took longer
    return {**estimate, "actual": actual}
