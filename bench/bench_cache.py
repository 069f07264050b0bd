"""Bench (b): the teacher-output cache on vs off on the digits job, distillation phase only.

Runs examples/digits.json (baseline off) with `teacher_cache` on and off, interleaved, and reports the
distillation stage's seconds (cache building included) and the speedup.

    .venv/bin/python bench/bench_cache.py [--rounds 3] [--epochs N] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from app.schemas.job_spec import JobSpec
from workers.distill.contract import JobPaths
from workers.distill.runner import resolve_teacher, run_job


def stage_seconds(spec: JobSpec, data_dir: Path) -> tuple[float, float]:
    """(distillation stage seconds, best student accuracy) of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        results = run_job(
            spec, teacher=resolve_teacher("digits-cnn"), paths=JobPaths(Path(tmp)), data_dir=data_dir
        )
    return float(results.stages[0].seconds), results.best_student_accuracy  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: digits.json's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(".distillery"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    body = JobSpec.model_validate_json((Path(__file__).parents[1] / "examples" / "digits.json").read_text())
    specs = {}
    for cache in ("on", "off"):
        spec_body = body.model_dump(mode="json")
        spec_body["training_config"].update({"teacher_cache": cache, "baseline": False})
        if args.epochs:
            spec_body["training_config"]["epochs"] = args.epochs
        specs[cache] = JobSpec.model_validate(spec_body)
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    accuracy: dict[str, float] = {}
    for _ in range(args.rounds):
        for cache in ("on", "off"):
            elapsed, accuracy[cache] = stage_seconds(specs[cache], args.data_dir.resolve())
            seconds[cache].append(elapsed)
    table = Table(
        title=f"Teacher cache on digits ({specs['on'].training_config.epochs} epochs, {args.rounds} rounds)"
    )
    for column in ("teacher_cache", "distill seconds (median)", "all rounds", "best student acc"):
        table.add_column(column, justify="right")
    for cache in ("off", "on"):
        runs = ", ".join(f"{s:.2f}" for s in seconds[cache])
        table.add_row(cache, f"{statistics.median(seconds[cache]):.2f}", runs, f"{accuracy[cache]:.4f}")
    Console().print(table)
    speedup = statistics.median(seconds["off"]) / statistics.median(seconds["on"])
    Console().print(f"distillation phase speedup with the cache: {speedup:.1f}x")


if __name__ == "__main__":
    main()
