"""The generic distillation loop: one student, one teacher (or none: labels only), one adapter.

`train_run` is the whole loop in one function: AdamW with a cosine schedule, the teacher frozen (eval +
inference mode, or its outputs cached once), validation each epoch with the best student kept, bf16 autocast
on CUDA only, a checkpoint each epoch that `resume` restores exactly, progress and should-stop callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from app.schemas.job_spec import JobSpec, TeacherCache
from workers.distill.adapters.base import (
    Batch,
    ModelOutputs,
    TaskAdapter,
    TaskData,
    iterate_batches,
    make_batch,
    to_device,
)
from workers.distill.contract import EngineCallbacks, EngineError, JobStopped, Progress
from workers.distill.losses import FeatureProjector, LossInputs, combine_losses, needs

logger = logging.getLogger(__name__)

# Teacher outputs are cached when they fit in this many bytes (teacher_cache=auto).
TEACHER_CACHE_MAX_BYTES = int(os.environ.get("DISTILLERY_TEACHER_CACHE_MAX_BYTES", str(2 * 2**30)))
# Seconds between should_stop / progress calls inside an epoch (a cancel lands well within ~1 s).
CHECK_INTERVAL_S = 0.2
# Minimum seconds between epoch checkpoints (0: every epoch).
CHECKPOINT_MIN_INTERVAL_S = float(os.environ.get("DISTILLERY_CHECKPOINT_MIN_INTERVAL_S", "0"))
EVAL_BATCH_SIZE = 256


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def eval_loader(dataset: Any, data: TaskData, batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
    """CPU batches of a split in order."""
    for _, batch in iterate_batches(dataset, batch_size, data.collate):
        yield batch


class StopChecker:
    """Rate-limited should_stop: at most every CHECK_INTERVAL_S, and always when forced."""

    def __init__(self, callbacks: EngineCallbacks) -> None:
        self.callbacks = callbacks
        self.last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= CHECK_INTERVAL_S

    def check(self, where: str) -> None:
        self.last = time.monotonic()
        if self.callbacks.should_stop():
            raise JobStopped(f"stopped {where}")


class TeacherCacheStore:
    """Teacher outputs for every train example, computed once (teacher frozen, data deterministic).

    Tensors whose shape is the same for every batch are stacked (N, ...); tensors with a sequence dimension
    that varies between batches are kept per example and fitted (padded/truncated) to each batch's length;
    the positions this adds or removes are padding, which the losses ignore.
    """

    def __init__(self, stacked: dict[str, torch.Tensor | list[torch.Tensor]], layout: dict[str, int]) -> None:
        self.entries = stacked
        self.layout = layout  # number of hidden-state / attention layers: {"hidden": L, "attn": L}

    @staticmethod
    def build(
        teacher: nn.Module,
        adapter: TaskAdapter,
        data: TaskData,
        spec: JobSpec,
        *,
        device: torch.device,
        hidden_states: bool,
        attentions: bool,
        batch_size: int,
        max_bytes: int | None,
        stopper: StopChecker,
    ) -> TeacherCacheStore | None:
        """Run the teacher over the train split in order; None when the estimate exceeds `max_bytes`."""
        pieces: dict[str, list[torch.Tensor]] = {}
        layout: dict[str, int] = {}
        total = len(data.train)  # type: ignore[arg-type]
        with torch.inference_mode():
            for indices, cpu_batch in iterate_batches(data.train, batch_size, data.collate):
                batch = to_device(cpu_batch, device)
                with autocast(device):
                    outputs = adapter.forward(
                        teacher, batch, hidden_states=hidden_states, attentions=attentions
                    )
                outputs = adapter.cache_teacher_outputs(outputs, spec)
                if not pieces and max_bytes is not None:
                    estimate = adapter.cache_bytes_per_example(outputs, indices.numel()) * total
                    if estimate > max_bytes:
                        logger.info(
                            "teacher cache needs ~%d bytes > %d: recomputing instead", estimate, max_bytes
                        )
                        return None
                flat = _flatten(outputs)
                layout = {"hidden": len(outputs.hidden_states or ()), "attn": len(outputs.attentions or ())}
                for key, tensor in flat.items():
                    pieces.setdefault(key, []).append(tensor.detach().clone())
                if stopper.due():
                    stopper.check("while caching teacher outputs")
        entries: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        for key, chunks in pieces.items():
            if all(c.shape[1:] == chunks[0].shape[1:] for c in chunks):
                entries[key] = torch.cat(chunks)  # (N, ...)
            else:
                entries[key] = [row for chunk in chunks for row in chunk]  # N x (T_i, ...)
        return TeacherCacheStore(entries, layout)

    def lookup(self, indices: torch.Tensor, like: ModelOutputs | None) -> ModelOutputs:
        """Teacher outputs for the examples `indices`; variable-length entries fitted to `like`'s lengths."""
        flat: dict[str, torch.Tensor] = {}
        for key, entry in self.entries.items():
            if isinstance(entry, torch.Tensor):
                flat[key] = entry[indices if indices.device == entry.device else indices.to(entry.device)]
            else:
                rows = [entry[int(i)] for i in indices]
                length = _sequence_length(like, rows[0].dim())
                flat[key] = torch.stack([_fit(row, length) for row in rows])
        return _unflatten(flat, self.layout)


def _sequence_length(like: ModelOutputs | None, row_dims: int) -> int:
    if like is None or like.logits.dim() < 3:
        raise EngineError("unsupported", "variable-length cached teacher outputs need (B, T, ...) logits")
    del row_dims
    return like.logits.shape[1]


def _fit(row: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (zeros) or truncate every leading sequence dim of `row` (T_i, ...) / (h, T_i, T_i) to `length`."""
    for dim in range(row.dim()):
        size = row.shape[dim]
        if dim == 0 or (row.dim() == 3 and dim in (1, 2) and row.shape[1] == row.shape[2]):
            if size > length:
                row = row.narrow(dim, 0, length)
            elif size < length:
                pad_shape = list(row.shape)
                pad_shape[dim] = length - size
                row = torch.cat([row, row.new_zeros(pad_shape)], dim=dim)
    return row


def _flatten(outputs: ModelOutputs) -> dict[str, torch.Tensor]:
    flat = {"logits": outputs.logits}
    for i, h in enumerate(outputs.hidden_states or ()):
        flat[f"hidden.{i}"] = h
    for i, a in enumerate(outputs.attentions or ()):
        flat[f"attn.{i}"] = a
    for key, value in outputs.extra.items():
        flat[f"extra.{key}"] = value
    return flat


def _unflatten(flat: dict[str, torch.Tensor], layout: dict[str, int]) -> ModelOutputs:
    hidden = [flat[f"hidden.{i}"] for i in range(layout["hidden"])] or None
    attn = [flat[f"attn.{i}"] for i in range(layout["attn"])] or None
    extra = {k.removeprefix("extra."): v for k, v in flat.items() if k.startswith("extra.")}
    return ModelOutputs(logits=flat["logits"], hidden_states=hidden, attentions=attn, extra=extra)


@dataclass
class RunPlan:
    """One training run: the labels-only baseline or one distillation stage."""

    kind: str  # "baseline" | "distill"
    stage: int  # 1-based distillation stage; 0 for the baseline
    ratio: float  # target student params / original teacher params
    temperature: float
    alpha: float
    epochs: int
    weights: dict[str, float]


@dataclass
class RunState:
    """Everything a checkpoint holds about the run in progress."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None


@dataclass
class Progressor:
    """Maps run-local progress to the job's overall fraction and ETA."""

    callbacks: EngineCallbacks
    start: float  # overall fraction when training began
    end: float  # overall fraction when training ends
    total_steps: int  # optimizer steps over all runs
    steps_before: int = 0  # steps done in finished runs
    started: float = field(default_factory=time.monotonic)
    steps_at_start: int = 0  # steps already done when this process started (resume)

    def report(
        self, phase: str, plan: RunPlan, epoch: int, step: int, steps: int, metrics: dict[str, float]
    ) -> None:
        done = self.steps_before + (epoch - 1) * steps + step
        local = done / max(self.total_steps, 1)
        fresh = done - self.steps_at_start
        eta = (time.monotonic() - self.started) / fresh * (self.total_steps - done) if fresh > 0 else None
        self.callbacks.on_progress(
            Progress(
                phase=phase,
                fraction=self.start + (self.end - self.start) * local,
                stage=plan.stage or None,
                epoch=epoch,
                step=step,
                total_steps=steps,
                metrics=metrics,
                eta_seconds=eta,
            )
        )


Checkpointer = Callable[[dict[str, Any]], None]
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _best_is_better(adapter: TaskAdapter, metric: float, best: float | None) -> bool:
    if best is None:
        return True
    return metric > best if adapter.higher_is_better else metric < best


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Global and data-order RNG states, as tensors (loadable with weights_only)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flushes_checkpoints(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """The wrapped call returns or raises only once every checkpoint it handed over is on disk."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        finally:
            flush_checkpoints()

    return wrapper


@_flushes_checkpoints
def train_run(
    *,
    plan: RunPlan,
    student: nn.Module,
    teacher: nn.Module | None,
    adapter: TaskAdapter,
    data: TaskData,
    spec: JobSpec,
    device: torch.device,
    callbacks: EngineCallbacks,
    progressor: Progressor,
    checkpoint: Checkpointer,
    resume_from: dict[str, Any] | None,
    stopper: StopChecker,
) -> tuple[RunState, dict[str, Any]]:
    """Train `student` for `plan.epochs`; returns its state (best student kept) and cache info.

    `checkpoint(payload)` is called at the start and after every epoch with everything needed to resume;
    `resume_from` is such a payload for this run.
    """
    config = spec.training_config
    need_teacher, need_hidden, need_attn = needs(plan.weights)
    if need_teacher and teacher is None:
        raise EngineError("unsupported", "the loss terms need a teacher")
    student.to(device)
    phase = "baseline" if plan.kind == "baseline" else "distill"

    # Feature projection heads (trained with the student): widths from one probe batch.
    projector: FeatureProjector | None = None
    if need_hidden:
        assert teacher is not None
        probe = to_device(make_batch(data.train, torch.arange(min(2, len(data.train))), data.collate), device)  # type: ignore[arg-type]
        with torch.no_grad():
            s_probe = adapter.forward(student, probe, hidden_states=True)
            t_probe = adapter.forward(teacher, probe, hidden_states=True)
        if not s_probe.hidden_states or not t_probe.hidden_states:
            raise EngineError("unsupported", "feature_distillation needs hidden states from both models")
        projector = FeatureProjector(
            [h.shape[-1] for h in s_probe.hidden_states], [h.shape[-1] for h in t_probe.hidden_states]
        ).to(device)

    parameters = [p for p in student.parameters() if p.requires_grad]
    if projector is not None:
        parameters += list(projector.parameters())
    # The fused kernel updates every parameter in one op (CPU and CUDA): far less per-step overhead.
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in parameters)
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused or None
    )
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)  # type: ignore[arg-type]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, plan.epochs * steps_per_epoch)
    )
    generator = torch.Generator().manual_seed(config.seed + 1000 * plan.stage)
    state = RunState()

    if resume_from is not None:
        student.load_state_dict(resume_from["student"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        if projector is not None and resume_from.get("projector") is not None:
            projector.load_state_dict(resume_from["projector"])
        restore_rng_state(resume_from["rng"], generator)
        state = RunState(
            epoch=resume_from["epoch"],
            history=list(resume_from["history"]),
            best_metric=resume_from["best_metric"],
            best_epoch=resume_from["best_epoch"],
            best_state=resume_from["best_state"],
        )

    last_saved = {"epoch": -1, "at": 0.0}

    def save() -> None:
        last_saved.update(epoch=state.epoch, at=time.monotonic())
        checkpoint(
            {
                "epoch": state.epoch,
                "student": _state_copy(student),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "projector": _state_copy(projector) if projector is not None else None,
                "rng": rng_state(generator),
                "history": state.history,
                "best_metric": state.best_metric,
                "best_epoch": state.best_epoch,
                "best_state": state.best_state,
            }
        )

    if resume_from is None:
        save()
    progressor.steps_at_start = progressor.steps_before + state.epoch * steps_per_epoch
    progressor.started = time.monotonic()

    # Teacher outputs: cached once over the train split when allowed and small enough.
    cache: TeacherCacheStore | None = None
    cache_info: dict[str, Any] = {"used": False, "seconds": 0.0}
    if need_teacher and state.epoch < plan.epochs and config.teacher_cache != TeacherCache.off:
        assert teacher is not None
        started = time.monotonic()
        callbacks.on_event("phase", "caching teacher outputs", {"phase": "cache", "stage": plan.stage})
        max_bytes = None if config.teacher_cache == TeacherCache.on else TEACHER_CACHE_MAX_BYTES
        try:
            cache = TeacherCacheStore.build(
                teacher,
                adapter,
                data,
                spec,
                device=device,
                hidden_states=need_hidden,
                attentions=need_attn,
                batch_size=max(config.batch_size, EVAL_BATCH_SIZE),
                max_bytes=max_bytes,
                stopper=stopper,
            )
        except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
            logger.warning("teacher cache did not fit (%s): recomputing teacher outputs each step", exc)
            cache = None
        cache_info = {"used": cache is not None, "seconds": time.monotonic() - started}

    plan_terms = [name for name, weight in plan.weights.items() if weight != 0]  # combine_losses' order
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        started = time.monotonic()
        student.train()
        if projector is not None:
            projector.train()
        running = torch.zeros(1 + len(plan_terms), device=device)  # per-epoch sums of [total, *terms]
        pending: list[torch.Tensor] = []  # detached per-step losses, summed in chunks (one op per chunk)
        steps = 0
        for step, (indices, cpu_batch) in enumerate(
            iterate_batches(data.train, config.batch_size, data.collate, generator=generator), 1
        ):
            batch = cpu_batch
            if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
                batch = to_device(
                    {k: v.pin_memory() for k, v in cpu_batch.items()}, device, non_blocking=True
                )
            with autocast(device):
                student_out = adapter.forward(student, batch, hidden_states=need_hidden, attentions=need_attn)
                teacher_out: ModelOutputs | None = None
                if need_teacher:
                    if cache is not None:
                        teacher_out = cache.lookup(indices, student_out)
                    else:
                        assert teacher is not None
                        with torch.inference_mode():
                            teacher_out = adapter.forward(
                                teacher, batch, hidden_states=need_hidden, attentions=need_attn
                            )
                inputs = LossInputs(
                    student=student_out,
                    teacher=teacher_out,
                    targets=adapter.targets(batch),
                    temperature=plan.temperature,
                    projector=projector,
                    attention_mask=batch.get("attention_mask"),
                )
                total, terms = combine_losses(plan.weights, inputs)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            steps = step
            pending.append(total.detach())
            pending.extend(v.detach() for v in terms.values())
            if len(pending) >= 512:
                running += torch.stack(pending).view(-1, running.numel()).sum(dim=0)
                pending.clear()
            if stopper.due():
                if not math.isfinite(float(total.detach())):
                    raise _nan_error(plan, epoch, step, float(total.detach()))
                progressor.report(phase, plan, epoch, step, steps_per_epoch, {"loss": float(total.detach())})
                stopper.check(f"in {phase} stage {plan.stage} epoch {epoch}")
        if pending:
            running += torch.stack(pending).view(-1, running.numel()).sum(dim=0)
        names = ["total", *plan_terms]
        means = {
            name: float(value) / max(steps, 1) for name, value in zip(names, running.tolist(), strict=True)
        }
        if not math.isfinite(means["total"]):
            raise _nan_error(plan, epoch, steps, means["total"])
        metric = adapter.evaluate(student, eval_loader(data.val, data), device)
        if _best_is_better(adapter, metric, state.best_metric):
            state.best_metric, state.best_epoch, state.best_state = metric, epoch, _state_copy(student)
        entry = {
            "stage": plan.stage,
            "epoch": epoch,
            "student_accuracy": metric,
            "distillation_loss": means.get("soft_target_kl", means.get("token_kl", 0.0)),
            "student_loss": means.get("hard_target_ce", 0.0),
            "total_loss": means["total"],
            "seconds": round(time.monotonic() - started, 4),
            "learning_rate": scheduler.get_last_lr()[0],
            "losses": {k: v for k, v in means.items() if k != "total"},
        }
        state.history.append(entry)
        state.epoch = epoch
        # Every epoch by default, so a resume never repeats a finished epoch.
        # DISTILLERY_CHECKPOINT_MIN_INTERVAL_S
        # > 0 throttles sub-second epochs (the last epoch and a stop always write).
        if epoch == plan.epochs or time.monotonic() - last_saved["at"] >= CHECKPOINT_MIN_INTERVAL_S:
            save()
        callbacks.on_event(
            "metric",
            f"{phase} stage {plan.stage} epoch {epoch}/{plan.epochs}: val {adapter.metric} {metric:.4f}",
            {"phase": phase, **entry},
        )
        progressor.report(
            phase,
            plan,
            epoch,
            steps_per_epoch,
            steps_per_epoch,
            {"loss": means["total"], adapter.metric: metric},
        )
        try:
            stopper.check(f"after {phase} stage {plan.stage} epoch {epoch}")
        except JobStopped:
            if last_saved["epoch"] != state.epoch:
                save()  # stopping at an epoch boundary keeps that epoch
            raise
    return state, cache_info


def _nan_error(plan: RunPlan, epoch: int, step: int, value: float) -> EngineError:
    return EngineError(
        "nan_loss",
        f"the training loss became {value} (stage {plan.stage}, epoch {epoch}, step {step}); "
        "lower training_config.learning_rate or temperature, or check the data for invalid values",
    )


_MARKERS = frozenset({"__tensor__", "__tuple__", "__dict__"})
_PRIMITIVES = (bool, int, float, str, type(None))


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """A JSON-able mirror of `value` whose tensors are moved into `tensors` (by key).

    Dicts with string keys stay JSON objects; other dicts (e.g. an optimizer's int-keyed state) and tuples
    are wrapped in a marker object so they come back as they were.
    """
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, torch.Tensor):
        key = seen.get(id(value))
        if key is None:
            key = seen[id(value)] = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(type(k) is str for k in value) and not _MARKERS.intersection(value):
            return {
                k: v if isinstance(v, _PRIMITIVES) else _encode(v, tensors, seen) for k, v in value.items()
            }
        return {
            "__dict__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in value.items()]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [v if isinstance(v, _PRIMITIVES) else _encode(v, tensors, seen) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none. Safetensors + JSON: nothing is unpickled."""
    flush_checkpoints()
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        structure = json.loads(handle.metadata()["structure"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    payload: dict[str, Any] = _decode(structure, tensors)
    return payload


# One background writer per process: checkpoints are snapshotted on the training thread (tensors copied,
# structure serialised) and written in order behind it, so per-epoch checkpoints cost the loop only the copy.
_CHECKPOINT_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
_pending_writes: list[Future[None]] = []
_pending_lock = threading.Lock()


def _write_checkpoint_file(path: Path, tensors: dict[str, torch.Tensor], structure: str) -> None:
    """Write atomically (temp file + rename): a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"structure": structure})
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Snapshot `payload` now and write it in the background; `flush_checkpoints()` waits for the writes."""
    with _pending_lock:
        done = [future for future in _pending_writes if future.done()]
        for future in done:
            _pending_writes.remove(future)
    for future in done:
        future.result()  # a failed earlier write surfaces here rather than at the end of the run
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(payload, tensors, {}))
    future = _CHECKPOINT_WRITER.submit(_write_checkpoint_file, path, tensors, structure)
    with _pending_lock:
        _pending_writes.append(future)


def flush_checkpoints() -> None:
    """Wait until every checkpoint handed to `save_checkpoint` is on disk (re-raises a failed write)."""
    with _pending_lock:
        futures = list(_pending_writes)
        _pending_writes.clear()
    for future in futures:
        future.result()
