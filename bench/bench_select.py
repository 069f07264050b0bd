"""Bench: which epoch to deliver, best-validation or last, measured by test accuracy on digits.

For each method and seed it runs examples/digits.json (no baseline) and reads the test accuracy of the
best-validation epoch (`best_student_accuracy`) and of the last epoch (`final_student_accuracy`). For
single-stage methods one run gives both: `training_config.select` only chooses which weights are delivered,
not how the stage trains. For progressive distillation the choice also decides which student teaches the
next stage, so each selection is a run of its own and its `student_accuracy` is compared.
Attention distillation does not apply to the digits CNN (it has no attention maps).

    .venv/bin/python bench/bench_select.py [--seeds 0 1 2] [--methods response feature progressive]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from app.schemas.job_spec import JobSpec
from app.schemas.results import DistillationResults
from workers.distill.contract import JobPaths
from workers.distill.runner import resolve_teacher, run_job

METHODS = {
    "response": "response_distillation",
    "feature": "feature_distillation",
    "progressive": "progressive_distillation",
}


def run(base: JobSpec, data_dir: Path, **training: Any) -> DistillationResults:
    body = base.model_dump(mode="json")
    body["distillation_method"] = training.pop("method")
    body["training_config"].update(training)
    with tempfile.TemporaryDirectory() as tmp:
        return run_job(
            JobSpec.model_validate(body),
            teacher=resolve_teacher(base.teacher_model_name),
            paths=JobPaths(Path(tmp)),
            data_dir=data_dir,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=None, help="override examples/digits.json's epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(".distillery"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = JobSpec.model_validate_json((Path(__file__).parents[1] / "examples" / "digits.json").read_text())
    overrides: dict[str, Any] = {"baseline": False}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    data_dir = args.data_dir.resolve()
    table = Table(title="Delivered epoch on digits: test accuracy, best-validation vs last")
    for column in ("method", "seed", "best_validation (epoch)", "last", "last - best (points)", "s"):
        table.add_column(column, justify="right")
    differences: dict[str, list[float]] = {}
    for method in args.methods:
        for seed in args.seeds:
            started = time.monotonic()
            common = {**overrides, "seed": seed, "method": METHODS[method]}
            if method == "progressive":
                best_run = run(base, data_dir, **common, select="best_validation")
                last_run = run(base, data_dir, **common, select="last")
                best, last = best_run.student_accuracy, last_run.student_accuracy
                epoch = best_run.selected_epoch
            else:
                one = run(base, data_dir, **common, select="best_validation")
                best, last, epoch = one.best_student_accuracy, one.final_student_accuracy, one.selected_epoch
            assert best is not None and last is not None
            difference = 100.0 * (last - best)
            differences.setdefault(method, []).append(difference)
            row = (
                method,
                str(seed),
                f"{100 * best:.2f}% ({epoch})",
                f"{100 * last:.2f}%",
                f"{difference:+.2f}",
                f"{time.monotonic() - started:.0f}",
            )
            table.add_row(*row)
            print(" | ".join(row), flush=True)
    console = Console(width=100)
    console.print(table)
    everything = [d for values in differences.values() for d in values]
    for method, values in differences.items():
        console.print(
            f"{method}: last - best = {statistics.mean(values):+.2f} points (mean of {len(values)})"
        )
    wins = sum(d > 0 for d in everything)
    losses = sum(d < 0 for d in everything)
    console.print(
        f"all: last - best = {statistics.mean(everything):+.2f} points (mean of {len(everything)}); "
        f"last better {wins}, best_validation better {losses}, tied {len(everything) - wins - losses}"
    )


if __name__ == "__main__":
    main()
