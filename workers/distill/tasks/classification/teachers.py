"""Teachers for the `classification` task: the built-in digits CNN (built once per data dir) and local dirs.

The built-in teacher is trained deterministically on the digits train split the first time any job needs it,
under a file lock, and stored as safetensors; every worker and every resume then loads the very same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn

from workers.distill.contract import EngineCallbacks, EngineError, JobStopped, Progress
from workers.distill.kernel import TaskData, count_parameters, iterate_batches
from workers.distill.tasks.classification.models import DigitsCNN, build_model, model_config

# The recipe of the built-in teacher; a change rebuilds it (stored beside the weights).
DIGITS_TEACHER_RECIPE: dict[str, Any] = {
    "version": 2,
    "model": {"channels": 16, "hidden": 1500},
    "epochs": 20,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "weight_decay": 1e-4,
    "max_shift": 1,  # pixels; each batch is shifted by a seeded random offset (only the teacher is augmented)
    "seed": 0,
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
LOCAL_CONFIG_FILES = ("student_config.json", "config.json")


def _accuracy(model: nn.Module, data: Any) -> float:
    model.eval()
    correct = 0
    total = 0
    with torch.inference_mode():
        for _, batch in iterate_batches(data, 512, None):
            correct += int((model(batch["inputs"]).argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].shape[0]
    return correct / max(total, 1)


def _shifted(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch (B, S*S) with every image rolled by one seeded offset in [-max_shift, max_shift]^2."""
    shift = DIGITS_TEACHER_RECIPE["max_shift"]
    side = int(inputs.shape[1] ** 0.5)
    dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
    return torch.roll(inputs.view(-1, side, side), shifts=(dy, dx), dims=(1, 2)).reshape(inputs.shape)


def train_digits_teacher(data: TaskData, callbacks: EngineCallbacks) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train the digits CNN deterministically (fixed seed, deterministic kernels); keep the best val epoch."""
    recipe = DIGITS_TEACHER_RECIPE
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    rng_state = torch.get_rng_state()
    try:
        torch.manual_seed(recipe["seed"])
        model = DigitsCNN(
            in_features=data.info["in_features"], num_classes=data.num_labels or 10, **recipe["model"]
        )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"]
        )
        epochs = recipe["epochs"]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe["learning_rate"],
            total_steps=epochs * -(-len(data.train) // recipe["batch_size"]),  # type: ignore[arg-type]
        )
        generator = torch.Generator().manual_seed(recipe["seed"])
        best_accuracy = -1.0
        best_state: dict[str, torch.Tensor] = {}
        started = time.monotonic()
        for epoch in range(1, epochs + 1):
            model.train()
            for step, (_, batch) in enumerate(
                iterate_batches(data.train, recipe["batch_size"], None, generator=generator), 1
            ):
                loss = nn.functional.cross_entropy(
                    model(_shifted(batch["inputs"], generator)), batch["labels"]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if step % 5 == 0 and callbacks.should_stop():
                    raise JobStopped("stopped while building the digits-cnn teacher")
            accuracy = _accuracy(model, data.val)
            if accuracy >= best_accuracy:
                best_accuracy = accuracy
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elapsed = time.monotonic() - started
            callbacks.on_progress(
                Progress(
                    phase="teacher",
                    fraction=epoch / epochs,  # within the phase; the runner rescales it
                    epoch=epoch,
                    metrics={"teacher_val_accuracy": accuracy, "loss": loss.item()},
                    eta_seconds=elapsed / epoch * (epochs - epoch),
                )
            )
        model.load_state_dict(best_state)
        meta = {
            "recipe": recipe,
            "val_accuracy": best_accuracy,
            "test_accuracy": _accuracy(model, data.test),
            "parameters": count_parameters(model),
            "train_seconds": round(time.monotonic() - started, 3),
        }
        return model, meta
    finally:
        torch.set_rng_state(rng_state)
        torch.use_deterministic_algorithms(was_deterministic)


def load_model_dir(directory: Path) -> nn.Module:
    """A model saved as safetensors + an `{"architecture", "kwargs"}` config (e.g. a distilled student)."""
    config_path = next((directory / n for n in LOCAL_CONFIG_FILES if (directory / n).is_file()), None)
    weights = sorted(directory.glob("*.safetensors"))
    if config_path is None or not weights:
        raise EngineError(
            "teacher_not_found",
            f"{directory} needs a safetensors file and one of {', '.join(LOCAL_CONFIG_FILES)} "
            "(as written by a finished job's artifacts)",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = build_model(config)
        model.load_state_dict(load_file(str(weights[0])))
    except (OSError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise EngineError("teacher_not_found", f"cannot load the model in {directory}: {exc}") from exc
    return model.eval()


def get_digits_teacher(data_dir: Path, data: TaskData, callbacks: EngineCallbacks) -> tuple[nn.Module, bool]:
    """The built-in digits-cnn teacher from `data_dir/teachers/digits-cnn`, built once; (model, built_now)."""
    teachers = data_dir / "teachers"
    teachers.mkdir(parents=True, exist_ok=True)
    target = teachers / "digits-cnn"
    with FileLock(str(teachers / "digits-cnn.lock")):
        meta_path = target / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("recipe") == DIGITS_TEACHER_RECIPE:
                return load_model_dir(target), False
        callbacks.on_event("phase", "building the digits-cnn teacher", {"phase": "teacher"})
        model, meta = train_digits_teacher(data, callbacks)
        staging = Path(tempfile.mkdtemp(prefix=".digits-cnn-", dir=teachers))
        save_file(model.state_dict(), str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(model_config(model), indent=2), encoding="utf-8")
        (staging / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        callbacks.on_event("phase", "digits-cnn teacher built", {"phase": "teacher", **meta})
        return model.eval(), True
