"""The generic distillation loop: one student, one teacher (or none: labels only), one adapter.

`train_run` is the whole loop in one function: AdamW with a cosine schedule, the teacher frozen (eval +
inference mode, or its outputs cached once), validation each epoch with the best student kept, bf16 autocast
on CUDA only, a checkpoint each epoch that `resume` restores exactly, progress and should-stop callbacks.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.schemas.job_spec import JobSpec, TeacherCache
from workers.distill.adapter import TaskAdapter
from workers.distill.checkpoint import flushes_checkpoints, restore_rng_state, rng_state
from workers.distill.config import EngineConfig
from workers.distill.contract import EngineCallbacks, EngineError, JobStopped, Progress, StopChecker
from workers.distill.kept import StartFrom
from workers.distill.kernel import (
    Batch,
    ModelOutputs,
    TaskData,
    autocast,
    iterate_batches,
    make_batch,
    to_device,
)
from workers.distill.losses import FeatureProjector, LossInputs, combine_losses, needs
from workers.distill.signal_cache import cached_teacher_signal
from workers.distill.teacher_cache import TeacherCacheStore

if TYPE_CHECKING:
    from workers.distill.distributed import RankGroup

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 256


def eval_loader(dataset: Any, data: TaskData, batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
    """CPU batches of a split in order."""
    for _, batch in iterate_batches(dataset, batch_size, data.collate):
        yield batch


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

    def fraction_done(self) -> float:
        """The job fraction reached when the finished runs are done (where the next run starts)."""
        return self.start + (self.end - self.start) * self.steps_before / max(self.total_steps, 1)

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


def _best_is_better(adapter: TaskAdapter, metric: float, best: float | None) -> bool:
    if best is None:
        return True
    return metric > best if adapter.higher_is_better else metric < best


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@flushes_checkpoints
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
    engine: EngineConfig | None = None,
    parallel: RankGroup | None = None,
    start_from: StartFrom | None = None,
) -> tuple[RunState, dict[str, Any]]:
    """Train `student` for `plan.epochs`; returns its state (best student kept) and cache info.

    `checkpoint(payload)` is called at the start and after every epoch with everything needed to resume;
    `resume_from` is such a payload for this run. `start_from` (a fork, when not resuming) starts from a
    kept checkpoint's weights at its epoch with a fresh optimizer, the learning-rate schedule advanced to
    that epoch, and trains only the epochs after it. `parallel`: this process is one rank of a
    multi-process job (its data shard, DDP, reduced losses and validation; see `workers.distill.distributed`).
    """
    if parallel is not None:  # this rank's shard of the data, at its share of the global batch
        spec, data = parallel.for_rank(spec, data)
    config = spec.training_config
    engine = engine or EngineConfig()
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
            [h.shape[-1] for h in s_probe.hidden_states],
            [h.shape[-1] for h in t_probe.hidden_states],
            config.layer_mapping,
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
    elif start_from is not None:
        if start_from.epoch >= plan.epochs:
            raise EngineError(
                "nothing_to_train",
                f"the checkpoint is at epoch {start_from.epoch}; training_config.epochs must be larger",
            )
        try:
            student.load_state_dict(start_from.state)
        except RuntimeError as exc:
            raise EngineError(
                "parent_checkpoint_incompatible",
                f"the checkpoint's student does not fit this job's student (teacher, target_compression "
                f"and dataset must match the parent's): {str(exc)[:300]}",
            ) from exc
        with warnings.catch_warnings():  # stepping the schedule alone is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_from.epoch * steps_per_epoch):
                scheduler.step()
        for _ in range(start_from.epoch):  # the data order an uninterrupted run would see next
            torch.randperm(len(data.train), generator=generator)  # type: ignore[arg-type]
        state = RunState(
            epoch=start_from.epoch,
            history=list(start_from.history),
            best_metric=start_from.metric,
            best_epoch=start_from.epoch,
            best_state=_state_copy(student),
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
        max_bytes = None if config.teacher_cache == TeacherCache.on else engine.teacher_cache_max_bytes
        reusable = (
            engine.signal_cache_dir is not None
            and plan.stage <= 1
            and adapter.reusable_teacher_signal(spec, hidden_states=need_hidden, attentions=need_attn)
        )
        try:
            if reusable:
                assert engine.signal_cache_dir is not None
                cache, signal = cached_teacher_signal(
                    teacher,
                    adapter,
                    data,
                    spec,
                    device=device,
                    temperature=plan.temperature,
                    batch_size=max(config.batch_size, EVAL_BATCH_SIZE),
                    data_dir=engine.signal_cache_dir,
                    owner=engine.signal_cache_owner,
                    max_bytes=engine.signal_cache_max_bytes,
                    memory_bytes=max_bytes,
                    stopper=stopper,
                )
                data.info["teacher_signal_cache"] = signal
                callbacks.on_event(
                    "phase", f"teacher signal cache {signal['status']}", {"phase": "cache", **signal}
                )
            else:
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
                    temperature=plan.temperature,
                )
        except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
            logger.warning("teacher cache did not fit (%s): recomputing teacher outputs each step", exc)
            cache = None
        cache_info = {"used": cache is not None, "seconds": time.monotonic() - started}

    plan_terms = [name for name, weight in plan.weights.items() if weight != 0]  # combine_losses' order
    loss_options = adapter.loss_options(spec)
    forward_student = (
        functools.partial(adapter.forward, student)
        if parallel is None
        else parallel.student_forward(adapter, student, projector)
    )
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        started = time.monotonic()
        student.train()
        if projector is not None:
            projector.train()
        running = torch.zeros(1 + len(plan_terms), device=device)  # per-epoch sums of [total, *terms]
        step_rng = random.Random(f"{config.seed}/{plan.stage}/{epoch}")  # per epoch: a resume replays it
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
            chosen = adapter.step_batch(
                batch,
                indices,
                student=student,
                data=data,
                spec=spec,
                distilling=plan.kind == "distill",
                rng=step_rng,
            )
            batch = chosen.batch
            with autocast(device):
                student_out = forward_student(batch, hidden_states=need_hidden, attentions=need_attn)
                teacher_out: ModelOutputs | None = None
                if need_teacher:
                    if cache is not None and not chosen.fresh_teacher:
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
                    options=loss_options,
                    layer_mapping=config.layer_mapping,
                )
                weights = plan.weights
                if chosen.skip_terms:
                    weights = {k: 0.0 if k in chosen.skip_terms else w for k, w in weights.items()}
                total, terms = combine_losses(weights, inputs)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            steps = step
            pending.append(total.detach())
            # A step's own weights may skip a term: it counts 0 so every step adds len(plan_terms) values.
            pending.extend(terms[n].detach() if n in terms else total.new_zeros(()) for n in plan_terms)
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
        if parallel is not None:
            running = parallel.mean(running)  # every rank ran `steps` steps: the global per-step mean
        names = ["total", *plan_terms]
        means = {
            name: float(value) / max(steps, 1) for name, value in zip(names, running.tolist(), strict=True)
        }
        if not math.isfinite(means["total"]):
            raise _nan_error(plan, epoch, steps, means["total"])
        if parallel is None:
            metric = adapter.evaluate(student, eval_loader(data.val, data), device)
        else:
            metric = parallel.validate(adapter, student, data, device)
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
        # Every epoch by default, so a resume never repeats a finished epoch; a checkpoint interval > 0
        # throttles sub-second epochs (the last epoch and a stop always write).
        if epoch == plan.epochs or time.monotonic() - last_saved["at"] >= engine.checkpoint_min_interval_s:
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
