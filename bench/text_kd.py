"""Text-classification KD on a generated dataset: teacher vs student accuracy, retention, parameter ratio.

A tiny BERT without a classification head is the teacher: the job fine-tunes it first (phase
`teacher_finetune`), then distils it into a student at `--compression` of its parameters. Everything runs
through `run_job`, the code the workers run. Prints one table; `--json` also writes the results.

    .venv/bin/python bench/text_kd.py                # the figure for the notes
    .venv/bin/python bench/text_kd.py --rows 300 --epochs 1 --finetune-epochs 1   # quick smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import classification_rows, save_tiny_bert, write_jsonl
from workers.distill.contract import JobPaths, NullCallbacks, Progress
from workers.distill.runner import run_job


class PrintPhases(NullCallbacks):
    """Prints each phase once and every epoch metric."""

    def __init__(self) -> None:
        self.phase = ""
        self.started = time.monotonic()

    def on_progress(self, progress: Progress) -> None:
        if progress.phase != self.phase:
            self.phase = progress.phase
            print(f"[{time.monotonic() - self.started:7.1f}s] {progress.phase}", flush=True)

    def on_event(self, kind: str, message: str, data: dict[str, object]) -> None:
        if kind == "metric":
            print(f"           {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=0.05, help="fraction of labels flipped")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--compression", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--method", default="response_distillation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="text-kd-"))
    write_jsonl(root / "reviews.jsonl", classification_rows(args.rows, seed=0, noise=args.noise))
    save_tiny_bert(root / "teacher", head="none", layers=args.layers, hidden=args.hidden, heads=args.heads)
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "tiny-bert",
            "task": "sequence-classification",
            "target_compression": args.compression,
            "distillation_method": args.method,
            "dataset_config": {"kind": "file", "path": "reviews.jsonl"},
            "training_config": {
                "epochs": args.epochs,
                "batch_size": 32,
                "learning_rate": args.lr,
                "temperature": 4.0,
                "alpha": 0.7,
                "teacher_finetune_epochs": args.finetune_epochs,
                "max_seq_length": 32,
                "baseline": True,
            },
        }
    )
    teacher = TeacherSource(
        name="tiny-bert", kind=TeacherSourceKind.local, location="teacher", type="transformer"
    )
    started = time.monotonic()
    results = run_job(
        spec,
        teacher=teacher,
        paths=JobPaths(root / "job"),
        data_dir=root / "data",
        callbacks=PrintPhases(),
        file_root=root,
    )
    seconds = time.monotonic() - started
    rows = [
        ("teacher accuracy (test)", f"{results.teacher_accuracy:.4f}"),
        ("student accuracy (best, test)", f"{results.best_student_accuracy:.4f}"),
        ("label-only baseline (test)", f"{results.baseline_accuracy:.4f}"),
        ("KD gain (points)", f"{results.kd_gain:+.2f}"),
        ("retention", f"{results.accuracy_retention:.4f}"),
        ("teacher parameters", f"{results.original_parameters:,}"),
        ("student parameters", f"{results.compressed_parameters:,}"),
        ("compression ratio", f"{results.compression_ratio:.4f}"),
        ("speedup (batch 64)", f"{results.inference_speedup:.2f}x"),
        ("wall seconds", f"{seconds:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\ntext-classification KD, {args.rows} generated rows ({args.noise:.0%} label noise)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results.model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    main()
