"""Kept checkpoints: the student's weights at named points of a distillation run, for download and forks.

Beside the one resumable checkpoint (`checkpoint.CHECKPOINT_FILE`), a job keeps `last` (the latest epoch),
`best` (the best validation metric so far) and the most recent `epoch-N` snapshots, `EngineConfig.
checkpoint_keep` files in all. Each is a plain safetensors state dict whose metadata says what it is (run,
stage, epoch, validation metric, and the history up to it, so a fork carries its lineage). Files are written
by the checkpoint writer in order; every keep and removal is announced as a `checkpoint` event (data
`kept` / `removed`) so the caller can list them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.distill.checkpoint import load_weights, remove_file, save_weights
from workers.distill.contract import EngineCallbacks, EngineError

KEPT_SUFFIX = ".student.safetensors"


def kept_name(stage: int, epoch: int, *, stages: int) -> str:
    """`epoch-N`, or `stage-K-epoch-N` in a progressive job."""
    return f"epoch-{epoch}" if stages == 1 else f"stage-{stage}-epoch-{epoch}"


@dataclass(frozen=True)
class StartFrom:
    """A kept checkpoint loaded to start a new job from (a fork or a continuation)."""

    state: dict[str, torch.Tensor]
    epoch: int
    stage: int
    metric: float | None
    history: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> StartFrom:
        try:
            state, metadata = load_weights(path)
        except (OSError, ValueError) as exc:
            raise EngineError("parent_checkpoint_unreadable", f"cannot read {path.name}: {exc}") from exc
        if metadata.get("run_kind") != "distill":
            raise EngineError("parent_checkpoint_unsupported", "only distillation checkpoints can be forked")
        metric = metadata.get("metric")
        return cls(
            state=state,
            epoch=int(metadata["epoch"]),
            stage=int(metadata["stage"]),
            metric=float(metric) if metric not in (None, "", "null") else None,
            history=list(json.loads(metadata.get("history", "[]"))),
        )


class KeptCheckpoints:
    """Decides, after each epoch of a distillation run, which named weights to write or drop."""

    def __init__(
        self, folder: Path, *, keep: int, metric: str, stages: int, callbacks: EngineCallbacks
    ) -> None:
        self.folder = folder
        self.keep = keep
        self.metric = metric
        self.stages = stages
        self.callbacks = callbacks
        self._best_written: tuple[int, int] | None = None  # (stage, epoch)
        self._epochs: list[str] = sorted(
            (p.name.removesuffix(KEPT_SUFFIX) for p in folder.glob(f"*epoch-*{KEPT_SUFFIX}")),
            key=lambda n: [int(part) for part in n.split("-") if part.isdigit()],
        )

    def after_epoch(self, *, run_kind: str, stage: int, payload: dict[str, Any]) -> None:
        """Called with the resumable payload after an epoch (epoch 0, the run's start, keeps nothing)."""
        epoch = int(payload["epoch"])
        if run_kind != "distill" or epoch == 0:
            return
        history = list(payload["history"])
        value = history[-1].get("student_accuracy") if history else None
        self._write("last", "last", stage, epoch, value, payload["student"], history)
        if payload.get("best_state") is not None and self._best_written != (stage, payload["best_epoch"]):
            best_epoch = int(payload["best_epoch"])
            self._write(
                "best",
                "best",
                stage,
                best_epoch,
                payload.get("best_metric"),
                payload["best_state"],
                [h for h in history if h.get("epoch", 0) <= best_epoch],
            )
            self._best_written = (stage, best_epoch)
        room = self.keep - 2
        if room <= 0:
            return
        name = kept_name(stage, epoch, stages=self.stages)
        self._write(name, "epoch", stage, epoch, value, payload["student"], history)
        if name not in self._epochs:
            self._epochs.append(name)
        while len(self._epochs) > room:
            gone = self._epochs.pop(0)
            remove_file(self.folder / f"{gone}{KEPT_SUFFIX}")
            self.callbacks.on_event("checkpoint", f"removed checkpoint {gone}", {"removed": gone})

    def _write(
        self,
        name: str,
        kind: str,
        stage: int,
        epoch: int,
        value: float | None,
        state: dict[str, torch.Tensor],
        history: list[dict[str, Any]],
    ) -> None:
        path = self.folder / f"{name}{KEPT_SUFFIX}"
        metadata = {
            "name": name,
            "run_kind": "distill",
            "stage": str(stage),
            "epoch": str(epoch),
            "metric_name": self.metric,
            "metric": "" if value is None else repr(float(value)),
            "history": json.dumps(history, default=float),
        }
        size = save_weights(path, state, metadata)
        self.callbacks.on_event(
            "checkpoint",
            f"kept checkpoint {name} (stage {stage} epoch {epoch})",
            {
                "kept": name,
                "kind": kind,
                "run_kind": "distill",
                "stage": stage,
                "epoch": epoch,
                "metric_name": self.metric,
                "metric_value": None if value is None else float(value),
                "weights_path": str(path),
                "bytes": size,
            },
        )
