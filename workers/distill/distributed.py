"""One job on several processes (`training_config.world_size` > 1): launch, rendezvous, collectives, watch.

`run_distributed` (called by `runner.run_job`) starts `world_size` rank processes with torch.multiprocessing
(a forkserver: fresh interpreters like spawn, with the engine imported once) and a torchrun-style env://
rendezvous on a free local port (MASTER_ADDR=127.0.0.1), `gloo` on CPU, `nccl` on CUDA (rank r on cuda:r).
Every rank runs the same phases (`runner.run_job_rank`) with a `RankGroup`:

- data: each rank trains on a fixed shard of the train split, chosen once by a `DistributedSampler` seeded
  with the job's seed (so each rank caches the teacher outputs of its own shard), shuffled each epoch by the
  loop's own seeded generator, at batch_size / world_size examples per step (batch_size is the global batch);
- the student steps through `DistributedDataParallel` (the feature projector inside the same wrapper), so
  gradients are averaged over the global batch; epoch losses are averaged over ranks; validation sums
  (correct/total, or NLL/tokens) are all-reduced over disjoint validation shards;
- stop checks are collective: rank 0 asks the parent (which asks the real callbacks: cancel, lease lost) and
  broadcasts the answer, so every rank stops at the same step;
- rank 0 alone reports: its callbacks send progress and events over a queue to the parent, which relays them
  to the caller's callbacks (the worker's reporter keeps beating from the parent); rank 0 alone writes
  checkpoints and, after training, measures, compresses and exports on one device;
- failures: the process group has a timeout (`EngineConfig.distributed_timeout_s`) and the parent watches
  every child: a rank that dies or fails ends the job with `distributed_failure` (the other ranks are
  terminated, nothing hangs); children exit when the parent dies.

world_size 1 never comes here: it runs today's single-process path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing.process
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from app.schemas.job_spec import JobSpec
from workers.distill.adapter import TaskAdapter
from workers.distill.contract import (
    CHECK_INTERVAL_S,
    EngineCallbacks,
    EngineError,
    JobPaths,
    JobStopped,
    NamedStudent,
    NullCallbacks,
    Progress,
    StopChecker,
)
from workers.distill.kernel import Batch, ModelOutputs, TaskData, TensorDictDataset, iterate_batches

if TYPE_CHECKING:
    from app.schemas.results import DistillationResults
    from app.schemas.teachers import TeacherSource
    from workers.distill.config import EngineConfig

logger = logging.getLogger(__name__)

DISTRIBUTED_FAILURE = "distributed_failure"
RANKS_FILE = "ranks.json"  # in the job's work dir while the ranks run: [{"rank", "pid"}] (ops, tests)
EVAL_BATCH_SIZE = 256
# Seconds the ranks get to exit on their own once rank 0 has reported how the job ended.
EXIT_GRACE_S = 30.0


# ---- inside a rank -----------------------------------------------------------------------------------


class CollectiveStopChecker(StopChecker):
    """StopChecker whose answers rank 0 decides and broadcasts, so every rank stops at the same step."""

    def __init__(self, callbacks: EngineCallbacks, group: RankGroup) -> None:
        super().__init__(callbacks)
        self.group = group
        self.collective = True  # False once training is over and rank 0 continues alone

    def due(self) -> bool:
        if not self.collective:
            return super().due()
        return self.group.broadcast_flag(self.group.is_main and super().due())

    def check(self, where: str) -> None:
        if not self.collective:
            super().check(where)
            return
        self.last = time.monotonic()
        if self.group.broadcast_flag(self.group.is_main and self.callbacks.should_stop()):
            raise JobStopped(f"stopped {where}")


class _StudentStep(nn.Module):
    """The student's training forward as one module, so DDP sees it (and the projector's parameters)."""

    def __init__(self, adapter: TaskAdapter, student: nn.Module, projector: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        if projector is not None:
            self.projector = projector  # used by the loss after forward; its gradients are reduced too
        self._adapter = adapter

    def forward(self, batch: Batch, *, hidden_states: bool = False, attentions: bool = False) -> ModelOutputs:
        return self._adapter.forward(self.student, batch, hidden_states=hidden_states, attentions=attentions)


@dataclass
class RankGroup:
    """This process's place in the job's process group, and the collectives the engine uses."""

    rank: int
    world_size: int
    device: torch.device
    stopper: CollectiveStopChecker | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU for nccl, the CPU for gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def make_stopper(self, callbacks: EngineCallbacks) -> CollectiveStopChecker:
        self.stopper = CollectiveStopChecker(callbacks, self)
        return self.stopper

    def broadcast_flag(self, value: bool) -> bool:
        flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=self.comm_device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def for_rank(self, spec: JobSpec, data: TaskData) -> tuple[JobSpec, TaskData]:
        """This rank's spec (batch_size = its share of the global batch) and data (its train shard, a
        disjoint slice of validation)."""
        config = spec.training_config
        rank_config = config.model_copy(update={"batch_size": config.batch_size // self.world_size})
        # The shard is fixed for the whole job (epoch 0 of a sampler seeded with the job's seed): a rank's
        # teacher cache covers exactly what it trains on. drop_last=False pads the last shard by repeating
        # examples, so every rank runs the same number of steps (the collectives stay in lockstep).
        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(data.train)),  # type: ignore[arg-type]
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=False,
        )
        train_indices = torch.tensor(list(sampler), dtype=torch.long)
        # Validation shards are disjoint and unpadded: summed correct/total equals the whole split's.
        val_indices = torch.arange(self.rank, len(data.val), self.world_size)  # type: ignore[arg-type]
        shard = TaskData(
            train=_subset(data.train, train_indices),
            val=_subset(data.val, val_indices),
            test=data.test,
            collate=data.collate,
            num_labels=data.num_labels,
            info=data.info,
        )
        return spec.model_copy(update={"training_config": rank_config}), shard

    def student_forward(
        self, adapter: TaskAdapter, student: nn.Module, projector: nn.Module | None
    ) -> Callable[..., ModelOutputs]:
        """The student's training forward through DistributedDataParallel (gradients averaged over ranks)."""
        step = _StudentStep(adapter, student, projector)
        wrapped = DistributedDataParallel(
            step,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        return wrapped

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over ranks (equal step counts: the mean of per-step sums is global)."""
        reduced = tensor.detach().to(self.comm_device, dtype=torch.float64)
        dist.all_reduce(reduced)
        return (reduced / self.world_size).to(tensor.device, dtype=tensor.dtype)

    def validate(self, adapter: TaskAdapter, model: nn.Module, data: TaskData, device: torch.device) -> float:
        """The validation metric of the whole split: every rank's (numerator, denominator) summed."""
        loader = (batch for _, batch in iterate_batches(data.val, EVAL_BATCH_SIZE, data.collate))
        numerator, denominator = adapter.evaluate_totals(model, loader, device)
        totals = torch.tensor([numerator, denominator], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(totals)
        return adapter.metric_from_totals(float(totals[0]), float(totals[1]))

    def check_replicas(self, model: nn.Module) -> None:
        """DDP keeps every rank's parameters identical; a difference means gradients were not averaged."""
        with torch.no_grad():
            local = torch.stack(
                [p.detach().double().sum() for p in model.parameters()]
                + [p.detach().double().abs().sum() for p in model.parameters()]
            ).to(self.comm_device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
            raise EngineError(
                DISTRIBUTED_FAILURE, "the ranks' students diverged (gradients were not averaged)"
            )

    def leave_after_training(self) -> bool:
        """End the group once every rank has trained; True on rank 0, which continues alone."""
        dist.barrier()
        if self.stopper is not None:
            self.stopper.collective = False
        dist.destroy_process_group()
        return self.is_main


def _subset(dataset: Dataset[Batch], indices: torch.Tensor) -> Dataset[Batch]:
    if isinstance(dataset, TensorDictDataset):  # keeps the loop's whole-batch indexing fast
        return TensorDictDataset({name: t[indices] for name, t in dataset.tensors.items()})
    return Subset(dataset, indices.tolist())


class _QueueCallbacks:
    """Rank 0's callbacks: progress and events go to the parent; should_stop and may_write read the flags
    the parent sets from its own callbacks (the worker's lease)."""

    def __init__(self, events: Any, stop_flag: Any, write_flag: Any) -> None:
        self.events = events
        self.stop_flag = stop_flag
        self.write_flag = write_flag

    def on_progress(self, progress: Progress) -> None:
        self.events.put(("progress", progress))

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.put(("event", kind, message, data))

    def should_stop(self) -> bool:
        return bool(self.stop_flag.value)

    def may_write(self) -> bool:
        return bool(self.write_flag.value)


@dataclass(frozen=True)
class RankJob:
    """What every rank needs to run the job (picklable: it crosses the spawn)."""

    spec: JobSpec
    teacher: TeacherSource
    paths: JobPaths
    data_dir: Path
    resume: bool
    file_root: Path | None
    trust_remote_code: bool
    engine: EngineConfig
    named: NamedStudent | None
    start_from: Path | None = None  # a kept checkpoint of another job to start from (runner.run_job)


@dataclass(frozen=True)
class RankLaunch:
    rank: int
    world_size: int
    port: int
    backend: str
    device_type: str
    threads: int
    parent_pid: int
    timeout_s: float


def _exit_with_parent(parent_pid: int) -> None:
    """A rank whose parent died (worker killed) must not go on training and writing checkpoints."""

    def watch() -> None:
        while True:  # the ranks' parent is the forkserver: watch the launching process by its pid
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _rank_main(launch: RankLaunch, job: RankJob, events: Any, stop_flag: Any, write_flag: Any) -> None:
    """One rank: join the group, run the job's phases, report how it ended to the parent."""
    # Ctrl-C reaches the whole terminal process group: the parent turns it into a stop the ranks share.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(launch.parent_pid)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(launch.port),
        RANK=str(launch.rank),
        LOCAL_RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
    )
    torch.set_num_threads(launch.threads)
    if launch.device_type == "cuda":
        torch.cuda.set_device(launch.rank)
        device = torch.device("cuda", launch.rank)
    else:
        device = torch.device("cpu")
    try:
        dist.init_process_group(
            launch.backend,
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=launch.timeout_s),
        )
        group = RankGroup(rank=launch.rank, world_size=launch.world_size, device=device)
        callbacks: EngineCallbacks = (
            _QueueCallbacks(events, stop_flag, write_flag) if group.is_main else NullCallbacks()
        )
        from workers.distill.runner import run_job_rank

        results = run_job_rank(
            job.spec,
            teacher=job.teacher,
            paths=job.paths,
            data_dir=job.data_dir,
            callbacks=callbacks,
            resume=job.resume,
            file_root=job.file_root,
            trust_remote_code=job.trust_remote_code,
            engine=job.engine,
            named=job.named,
            ranks=group,
            start_from=job.start_from,
        )
        if results is not None:
            events.put(("done", launch.rank, results.model_dump_json()))
        else:
            events.put(("finished", launch.rank))
    except JobStopped as exc:
        events.put(("stopped", launch.rank, str(exc)))
    except EngineError as exc:
        events.put(("error", launch.rank, exc.code, exc.message))
    except dist.DistError as exc:  # a collective failed: a peer died or timed out
        events.put(("error", launch.rank, DISTRIBUTED_FAILURE, f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        logger.exception("rank %d failed", launch.rank)
        events.put(("error", launch.rank, "internal_error", f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        events.close()
        events.join_thread()


# ---- in the parent (the worker's task, the CLI runner) ----------------------------------------------


def free_port() -> int:
    """A free TCP port on the loopback interface for the rendezvous store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process (a Celery prefork pool process, a billiard process) start the ranks.

    multiprocessing refuses children of daemonic processes because they would be orphaned when the daemon
    is terminated; the ranks handle that themselves (they exit when the launching process is gone, and the
    launcher terminates them on every way out of `run_distributed`).
    """
    config = multiprocessing.process.current_process()._config  # type: ignore[attr-defined]
    daemon, authkey = config.get("daemon"), config.get("authkey")
    config["daemon"] = False
    if authkey is not None:  # billiard's own key type refuses the pickling the launch needs
        config["authkey"] = multiprocessing.process.AuthenticationString(  # type: ignore[attr-defined]
            bytes(authkey)
        )
    try:
        yield
    finally:
        if daemon is None:
            config.pop("daemon", None)
        else:
            config["daemon"] = daemon
        if authkey is not None:
            config["authkey"] = authkey


def rank_context() -> Any:
    """Where ranks come from: a forkserver that has imported the engine once (torch, transformers, the
    adapters), so a job's ranks start in well under a second after the first; a fresh interpreter like
    spawn (no inherited threads, CUDA state or sockets), never a fork of the worker itself."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["workers.distill.runner"])
    return context


def run_distributed(job: RankJob, *, callbacks: EngineCallbacks) -> DistillationResults:
    """Run `job` on `world_size` rank processes; rank 0's results, or the error that ended the job."""
    from app.schemas.results import DistillationResults
    from workers.distill.registry import get_adapter
    from workers.distill.runner import resolve_device

    spec = job.spec
    world = spec.training_config.world_size
    device = resolve_device(spec.training_config.device)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise EngineError(
            "device_unavailable",
            f"training_config.world_size is {world} but this worker has {torch.cuda.device_count()} CUDA "
            "device(s)",
        )
    threads = get_adapter(spec.task).cpu_threads() or max(1, (os.cpu_count() or 1) // world)
    context = rank_context()
    events = context.Queue()
    stop_flag = context.Value("b", 0)
    write_flag = context.Value("b", int(callbacks.may_write()))
    port = free_port()
    ranks_file = job.paths.work_dir / RANKS_FILE
    processes: list[Any] = []
    try:
        with _children_allowed():  # a Process copies the launcher's config when it is built
            for rank in range(world):
                launch = RankLaunch(
                    rank=rank,
                    world_size=world,
                    port=port,
                    backend="nccl" if device.type == "cuda" else "gloo",
                    device_type=device.type,
                    threads=threads,
                    parent_pid=os.getpid(),
                    timeout_s=job.engine.distributed_timeout_s,
                )
                process = context.Process(
                    target=_rank_main,
                    args=(launch, job, events, stop_flag, write_flag),
                    name=f"distill-rank-{rank}",
                    daemon=True,
                )
                processes.append(process)
                process.start()
        ranks_file.parent.mkdir(parents=True, exist_ok=True)
        ranks_file.write_text(
            json.dumps([{"rank": r, "pid": p.pid} for r, p in enumerate(processes)]), encoding="utf-8"
        )
        flags = _Flags(stop=stop_flag, write=write_flag)
        outcome = _watch(processes, events, flags, callbacks, job.engine.distributed_timeout_s)
    finally:
        started = [process for process in processes if process.pid is not None]
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        events.close()
        events.cancel_join_thread()
        ranks_file.unlink(missing_ok=True)
    return DistillationResults.model_validate_json(outcome)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(frozen=True)
class _Flags:
    """What the parent tells the ranks: stop (should_stop) and whether rank 0 may write (may_write)."""

    stop: Any
    write: Any


def _watch(
    processes: list[Any], events: Any, flags: _Flags, callbacks: EngineCallbacks, timeout_s: float
) -> str:
    """Relay rank 0's reports and the flags until the job ends; rank 0's results (JSON) or raise."""
    reported: dict[int, tuple[Any, ...]] = {}  # rank -> its end: done, finished, stopped or error
    ended_at: float | None = None  # when rank 0 (or any rank, on error) reported the end
    stop_asked_at: float | None = None
    last_poll = 0.0
    while True:
        try:
            message = events.get(timeout=0.1)
        except queue.Empty:
            message = None
        while message is not None:
            kind = message[0]
            if kind == "progress":
                callbacks.on_progress(message[1])
            elif kind == "event":
                callbacks.on_event(message[1], message[2], message[3])
            else:
                reported[message[1]] = message
                if ended_at is None and (message[1] == 0 or kind == "error"):
                    ended_at = time.monotonic()
            try:
                message = events.get_nowait()
            except queue.Empty:
                message = None
        now = time.monotonic()
        if now - last_poll >= CHECK_INTERVAL_S and stop_asked_at is None:
            last_poll = now
            if callbacks.should_stop():
                flags.stop.value = 1
                stop_asked_at = now
        flags.write.value = int(callbacks.may_write())
        died = [
            (rank, p.exitcode)
            for rank, p in enumerate(processes)
            if p.exitcode is not None and p.exitcode != 0 and rank not in reported
        ]
        if died:
            rank, code = died[0]
            raise EngineError(
                DISTRIBUTED_FAILURE,
                f"rank {rank} of {len(processes)} (pid {processes[rank].pid}) {_describe_exit(code)} "
                "during the job; the job was stopped on every rank. Resubmit it to resume from its last "
                "checkpoint",
            )
        if ended_at is not None and (_others_settled(reported, processes) or now - ended_at >= EXIT_GRACE_S):
            return _conclude(reported, processes)
        if all(p.exitcode is not None for p in processes):
            raise EngineError(DISTRIBUTED_FAILURE, "the ranks exited without reporting results")
        if stop_asked_at is not None and now - stop_asked_at > timeout_s + EXIT_GRACE_S:
            raise JobStopped("stopped: the ranks did not stop in time and were terminated")


def _others_settled(reported: dict[int, tuple[Any, ...]], processes: list[Any]) -> bool:
    """Every rank has reported or exited."""
    return all(rank in reported or p.exitcode is not None for rank, p in enumerate(processes))


def _conclude(reported: dict[int, tuple[Any, ...]], processes: list[Any]) -> str:
    """The job's end from the ranks' reports: rank 0's results, or the first real error (a rank's own error
    before the collective errors it caused in its peers)."""
    errors = [m for m in reported.values() if m[0] == "error"]
    root = [m for m in errors if m[2] != DISTRIBUTED_FAILURE] or errors
    main = reported.get(0)
    if root:
        rank, code, message = root[0][1], root[0][2], root[0][3]
        if code == "internal_error":
            code = DISTRIBUTED_FAILURE
        raise EngineError(code, f"rank {rank}: {message}" if len(processes) > 1 else message)
    if main is not None and main[0] == "stopped":
        raise JobStopped(main[2])
    if main is not None and main[0] == "done":
        return str(main[2])
    raise EngineError(DISTRIBUTED_FAILURE, "rank 0 ended without results")


__all__ = [
    "DISTRIBUTED_FAILURE",
    "RANKS_FILE",
    "CollectiveStopChecker",
    "RankGroup",
    "RankJob",
    "free_port",
    "run_distributed",
]
