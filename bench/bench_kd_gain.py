"""Bench (c): KD vs label-only training of the same student on digits, over several seeds.

Runs examples/digits.json with `baseline: true` for each seed; the engine trains the same student (same
init, same epochs) once on labels only and once with KD, and reports kd_gain in points.

    .venv/bin/python bench/bench_kd_gain.py [--seeds 0 1 2] [--threads 2]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(".distillery"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = JobSpec.model_validate_json((Path(__file__).parents[1] / "examples" / "digits.json").read_text())
    table = Table(title="KD vs label-only on digits (test accuracy, same student and epochs)")
    for column in ("seed", "teacher", "label-only", "KD", "kd_gain (points)", "retention"):
        table.add_column(column, justify="right")
    gains: list[float] = []
    for seed in args.seeds:
        body = base.model_dump(mode="json")
        body["training_config"].update({"seed": seed, "baseline": True})
        with tempfile.TemporaryDirectory() as tmp:
            results = run_job(
                JobSpec.model_validate(body),
                teacher=resolve_teacher(base.teacher_model_name),
                paths=JobPaths(Path(tmp)),
                data_dir=args.data_dir.resolve(),
            )
        assert results.kd_gain is not None and results.baseline_accuracy is not None
        gains.append(results.kd_gain)
        table.add_row(
            str(seed),
            f"{results.teacher_accuracy:.4f}",
            f"{results.baseline_accuracy:.4f}",
            f"{results.best_student_accuracy:.4f}",
            f"{results.kd_gain:+.2f}",
            f"{results.accuracy_retention:.4f}",
        )
    Console().print(table)
    sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
    Console().print(
        f"kd_gain over {len(gains)} seeds: {statistics.mean(gains):+.2f} ± {sd:.2f} points (mean ± sd)"
    )


if __name__ == "__main__":
    main()
