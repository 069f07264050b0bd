"""Bench (a): our trainer against a minimal hand-written PyTorch KD loop, same models, data and steps.

Both loops train the same student (same init) from the same digits-cnn teacher for the same number of
optimizer steps, with the same optimizer, schedule, loss and per-epoch validation. Rounds are interleaved
(ours, plain, ours, plain, ...) and the median samples/s of each is reported, with teacher outputs
recomputed every step (cache off) and, separately, precomputed once (cache on) in both loops.

    .venv/bin/python bench/bench_trainer.py [--rounds 5] [--epochs 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from app.schemas.job_spec import JobSpec
from workers.distill.checkpoint import save_checkpoint
from workers.distill.contract import NullCallbacks, StopChecker
from workers.distill.loop import Progressor, train_run
from workers.distill.registry import get_adapter
from workers.distill.runner import build_plans, resolve_teacher


def ours(spec: JobSpec, adapter: Any, data: Any, teacher: torch.nn.Module) -> float:
    """Seconds for our train_run (checkpoints to a temp dir, as in a job)."""
    plan = build_plans(spec, adapter)[-1]
    student = adapter.build_student(teacher, plan.ratio, seed=spec.training_config.seed)
    callbacks = NullCallbacks()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.safetensors"
        started = CLOCK()
        train_run(
            plan=plan,
            student=student,
            teacher=teacher,
            adapter=adapter,
            data=data,
            spec=spec,
            device=torch.device("cpu"),
            callbacks=callbacks,
            progressor=Progressor(callbacks, 0.0, 1.0, 1),
            checkpoint=lambda payload: save_checkpoint(path, payload),
            resume_from=None,
            stopper=StopChecker(callbacks),
        )
        return CLOCK() - started


def plain(spec: JobSpec, adapter: Any, data: Any, teacher: torch.nn.Module) -> float:
    """Seconds for the minimal loop: tensors, the same (fused) AdamW, KL*T^2 + CE, validation each epoch."""
    config = spec.training_config
    plan = build_plans(spec, adapter)[-1]
    student = adapter.build_student(teacher, plan.ratio, seed=config.seed)
    x, y = data.train.tensors["inputs"], data.train.tensors["labels"]
    x_val, y_val = data.val.tensors["inputs"], data.val.tensors["labels"]
    started = CLOCK()
    cached = None
    if config.teacher_cache != "off":
        with torch.inference_mode():
            cached = teacher(x)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    steps = math.ceil(len(x) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
    generator = torch.Generator().manual_seed(config.seed)
    temperature, alpha = plan.temperature, plan.alpha
    for _ in range(config.epochs):
        student.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = student(x[idx])
            if cached is not None:
                teacher_logits = cached[idx]
            else:
                with torch.inference_mode():
                    teacher_logits = teacher(x[idx])
            kl = F.kl_div(
                F.log_softmax(logits / temperature, -1),
                F.log_softmax(teacher_logits / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            loss = alpha * kl * temperature**2 + (1 - alpha) * F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        student.eval()
        with torch.inference_mode():
            _ = (student(x_val).argmax(-1) == y_val).float().mean().item()
    return CLOCK() - started


CLOCK = time.perf_counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(".distillery"))
    parser.add_argument(
        "--cpu-time", action="store_true", help="time with process CPU time (steadier on a shared machine)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    adapter = get_adapter("classification")
    base = JobSpec.model_validate_json((Path(__file__).parents[1] / "examples" / "digits.json").read_text())
    data = adapter.load_data(base, data_dir=args.data_dir, file_root=None)
    teacher = adapter.load_teacher(
        resolve_teacher("digits-cnn"),
        base,
        data,
        data_dir=args.data_dir.resolve(),
        file_root=None,
        device=torch.device("cpu"),
        callbacks=NullCallbacks(),
        trust_remote_code=False,
    ).requires_grad_(False)
    samples = len(data.train) * args.epochs
    clock = "CPU time" if args.cpu_time else "wall time"
    table = Table(
        title=f"Trainer vs plain loop: digits, {args.epochs} epochs x {args.rounds} rounds, cpu, {clock}"
    )
    for column in ("teacher outputs", "ours samples/s", "plain samples/s", "ratio ours/plain"):
        table.add_column(column, justify="right")
    figures: dict[str, object] = {
        "task": "digits",
        "device": "cpu",
        "epochs": args.epochs,
        "rounds": args.rounds,
        "threads": args.threads,
        "clock": clock,
    }
    for cache in ("off", "on"):
        body = base.model_dump(mode="json")
        body["training_config"].update({"epochs": args.epochs, "teacher_cache": cache, "baseline": False})
        spec = JobSpec.model_validate(body)
        ours(spec, adapter, data, teacher)  # warm-up
        plain(spec, adapter, data, teacher)
        ours_s: list[float] = []
        plain_s: list[float] = []
        for _ in range(args.rounds):
            ours_s.append(ours(spec, adapter, data, teacher))
            plain_s.append(plain(spec, adapter, data, teacher))
        ours_rate = samples / statistics.median(ours_s)
        plain_rate = samples / statistics.median(plain_s)
        label = "recomputed each step" if cache == "off" else "cached once"
        table.add_row(label, f"{ours_rate:,.0f}", f"{plain_rate:,.0f}", f"{ours_rate / plain_rate:.3f}")
        figures[f"teacher_cache_{cache}"] = {
            "ours_samples_per_s": ours_rate,
            "plain_samples_per_s": plain_rate,
            "ratio_ours_over_plain": ours_rate / plain_rate,
        }
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
