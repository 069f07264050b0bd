"""Bench: the retention search on digits vs a by-hand sweep of target_compression.

For each target (default 0.95, 0.98, 0.99) one job with `target_retention` runs the search and the final
training; the figures are the parameters it delivered, its test retention, the trials it used and the
seconds. The by-hand sweep trains one job per `target_compression` of a geometric grid with the same
training settings and reports, per target, the smallest size whose retention meets it, judged on the test
split (what a user reading the results would do) and on validation (what the search sees).

    .venv/bin/python bench/bench_search.py [--targets 0.95 0.98 0.99] [--epochs 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
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

SWEEP = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256]


def run(body: dict[str, Any], data_dir: Path) -> tuple[DistillationResults, float]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_job(
            JobSpec.model_validate(body),
            teacher=resolve_teacher("digits-cnn"),
            paths=JobPaths(Path(tmp)),
            data_dir=data_dir,
        )
    return results, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.98, 0.99])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--sweep", type=float, nargs="+", default=SWEEP)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(".distillery"))
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    training = {"epochs": args.epochs, "learning_rate": args.learning_rate, "device": "cpu", "seed": 0}
    base = {"teacher_model_name": "digits-cnn", "dataset_config": {"kind": "builtin", "name": "digits"}}
    console = Console()

    searches = []
    for target in args.targets:
        body = base | {
            "target_retention": target,
            "training_config": training | {"max_trials": args.max_trials},
        }
        results, seconds = run(body, args.data_dir)
        assert results.search is not None
        searches.append(
            {
                "target": target,
                "status": results.search.status,
                "target_met": results.target_met,
                "parameters": results.compressed_parameters,
                "ratio": results.compression_ratio,
                "test_retention": results.accuracy_retention,
                "validation_retention": results.search.final_validation_retention,
                "trials": len(results.trials),
                "search_seconds": results.search.seconds,
                "job_seconds": seconds,
                "trial_sizes": [t.parameters for t in results.trials],
                "teacher_validation": results.search.teacher_validation_accuracy,
            }
        )
        console.print(searches[-1])

    sweep = []
    started = time.monotonic()
    for ratio in args.sweep:
        results, seconds = run(
            base | {"target_compression": ratio, "training_config": training}, args.data_dir
        )
        history = results.training_history
        validation = history[(results.selected_epoch or len(history)) - 1].student_accuracy
        sweep.append(
            {
                "ratio": ratio,
                "parameters": results.compressed_parameters,
                "test_retention": results.accuracy_retention,
                "validation_accuracy": validation,
                "seconds": seconds,
            }
        )
        console.print(sweep[-1])
    sweep_seconds = time.monotonic() - started
    teacher_validation = searches[0]["teacher_validation"]  # the split and teacher are the same for all
    for entry in sweep:
        entry["validation_retention"] = entry["validation_accuracy"] / teacher_validation

    table = Table(title=f"Retention search vs by-hand sweep (digits, {args.epochs} epochs, seed 0)")
    for column in (
        "target",
        "search: params (ratio)",
        "test retention",
        "met",
        "trials",
        "search s",
        "job s",
        "sweep smallest (test)",
        "sweep smallest (val)",
    ):
        table.add_column(column, justify="right")
    rows = []
    for entry in searches:
        target = entry["target"]
        by_test = next((s for s in sweep if s["test_retention"] >= target), None)
        by_val = next((s for s in sweep if s["validation_retention"] >= target), None)
        row = [
            f"{target:g}",
            f"{entry['parameters']:,} ({entry['ratio']:.4f})",
            f"{100 * entry['test_retention']:.2f}%",
            "yes" if entry["target_met"] else "no",
            str(entry["trials"]),
            f"{entry['search_seconds']:.1f}",
            f"{entry['job_seconds']:.1f}",
            f"{by_test['parameters']:,} ({by_test['ratio']:g})" if by_test else "none",
            f"{by_val['parameters']:,} ({by_val['ratio']:g})" if by_val else "none",
        ]
        rows.append(row)
        table.add_row(*row)
    console.print(table)
    console.print(
        f"sweep: {len(sweep)} jobs, {sweep_seconds:.1f} s; teacher validation {teacher_validation:.4f}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"searches": searches, "sweep": sweep, "sweep_seconds": sweep_seconds, "rows": rows}, indent=2
            )
        )


if __name__ == "__main__":
    main()
