"""Fine-tune a classification head (and body) before it teaches; cached per teacher, data and settings."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from transformers import PreTrainedModel

from app.schemas.job_spec import JobSpec
from workers.distill.contract import EngineCallbacks, EngineError, JobStopped, Progress
from workers.distill.kernel import TensorDictDataset, iterate_batches, to_device

_STOP_CHECK_EVERY = 5


def finetune_key(location: str, fingerprint: str, spec: JobSpec, num_labels: int) -> str:
    """Identifies one fine-tuning: teacher, data, label count and the settings that change the result."""
    config = spec.training_config
    parts = {
        "teacher": location,
        "data": fingerprint,
        "num_labels": num_labels,
        "epochs": config.teacher_finetune_epochs,
        "lr": config.learning_rate,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "max_seq_length": config.max_seq_length,
        "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def finetune_classifier(
    model: PreTrainedModel,
    train: TensorDictDataset,
    spec: JobSpec,
    *,
    device: torch.device,
    callbacks: EngineCallbacks,
) -> dict[str, float]:
    """Train `model` on labelled batches for teacher_finetune_epochs with AdamW; returns the last loss."""
    config = spec.training_config
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    nn.Module.to(model, device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    epochs = config.teacher_finetune_epochs
    steps_per_epoch = max(1, -(-len(train) // config.batch_size))
    started = time.monotonic()
    loss_value = float("nan")
    for epoch in range(1, epochs + 1):
        for step, (_, cpu_batch) in enumerate(
            iterate_batches(train, config.batch_size, None, generator=generator), start=1
        ):
            batch = to_device(cpu_batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                ).loss
            if not torch.isfinite(loss):
                raise EngineError("nan_loss", "teacher fine-tuning loss is not finite; lower learning_rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            done = ((epoch - 1) * steps_per_epoch + step) / (epochs * steps_per_epoch)
            elapsed = time.monotonic() - started
            callbacks.on_progress(
                Progress(
                    phase="teacher_finetune",
                    fraction=done,
                    epoch=epoch,
                    step=step,
                    total_steps=steps_per_epoch,
                    metrics={"teacher_loss": loss_value},
                    eta_seconds=elapsed / done * (1 - done) if done > 0 else None,
                )
            )
            if step % _STOP_CHECK_EVERY == 0 and callbacks.should_stop():
                raise JobStopped("stopped during teacher fine-tuning")
        callbacks.on_event(
            "metric",
            f"teacher fine-tune epoch {epoch}",
            {"phase": "teacher_finetune", "epoch": epoch, "teacher_loss": loss_value},
        )
    model.eval()
    return {"teacher_loss": loss_value, "seconds": time.monotonic() - started}


def finetuned_dir(data_dir: Path, key: str) -> Path:
    """Where one fine-tuned teacher is kept, shared by workers and resumes."""
    return data_dir / "teachers" / "finetuned" / key


def finetune_lock(data_dir: Path, key: str) -> FileLock:
    """A lock so two workers never fine-tune the same teacher at once."""
    path = data_dir / "teachers" / "finetuned" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))
