"""One rank vs two ranks on the same small text job: wall time and training time, through `run_job`.

A tiny BERT classifier (random init, saved locally) teaches a derived student on generated reviews
(tests/engine/tiny_models.py); the same spec runs with `training_config.world_size` 1 and 2, rounds
interleaved (1, 2, 1, 2, ...), medians reported. On CPU the comparison holds the core budget fixed: one
rank gets `--threads` intra-op threads, each of two ranks `--threads / 2`. `to_trained_s` is the wall time
from the call to the end of training (it includes spawning the ranks, each importing torch and the engine
and loading the data and the teacher; the phases after training run on rank 0 alone either way, so they
are left out); `training_s` is rank 0's train phase alone. `--task digits` runs the built-in digits job
instead (the `--smoke` default: seconds).

    .venv/bin/python bench/bench_ddp.py                      # CPU, gloo (the figures in bench/README.md)
    .venv/bin/python bench/bench_ddp.py --device cuda        # CUDA, nccl: one GPU vs two
    .venv/bin/python bench/bench_ddp.py --smoke              # seconds: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from tests.engine.tiny_models import classification_rows, save_tiny_bert, write_jsonl
from workers.distill.contract import JobPaths, NullCallbacks, Progress
from workers.distill.runner import resolve_teacher, run_job

REPO = Path(__file__).resolve().parents[1]


class TrainedAt(NullCallbacks):
    """Notes when training ends (the first progress of the phase after it)."""

    def __init__(self) -> None:
        self.trained_at: float | None = None

    def on_progress(self, progress: Progress) -> None:
        if self.trained_at is None and progress.phase == "evaluate":
            self.trained_at = time.monotonic()


def job_spec(*, task: str, epochs: int, batch_size: int, world_size: int, device: str, seq: int) -> JobSpec:
    if task == "digits":
        body = json.loads((REPO / "examples" / "tiny.json").read_text())
        body["training_config"].update(
            epochs=epochs, batch_size=batch_size, world_size=world_size, device=device
        )
        return JobSpec.model_validate(body)
    return JobSpec.model_validate(
        {
            "teacher_model_name": "tiny-bert",
            "task": "sequence-classification",
            "target_compression": 0.3,
            "dataset_config": {"kind": "file", "path": "reviews.jsonl"},
            "training_config": {
                "epochs": epochs,
                "batch_size": batch_size,
                "learning_rate": 1e-3,
                "max_seq_length": seq,
                "teacher_finetune_epochs": 0,
                "device": device,
                "world_size": world_size,
            },
        }
    )


def one_run(root: Path, spec: JobSpec, round_index: int, data_dir: Path) -> dict[str, float]:
    if spec.task == "classification":
        teacher = resolve_teacher("digits-cnn")
    else:
        teacher = TeacherSource(
            name="tiny-bert", kind=TeacherSourceKind.local, location=str(root / "teacher"), type="transformer"
        )
    callbacks = TrainedAt()
    started = time.monotonic()
    results = run_job(
        spec,
        teacher=teacher,
        paths=JobPaths(root / f"job-{spec.training_config.world_size}-{round_index}"),
        data_dir=data_dir,
        callbacks=callbacks,
        file_root=root,
        resume=False,
    )
    assert callbacks.trained_at is not None
    return {
        "to_trained_s": callbacks.trained_at - started,
        "training_s": results.training_seconds,
        "student_accuracy": results.student_accuracy,
        "final_loss": results.training_history[-1].total_loss,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds of world_size 1 and `args.world_size`; medians and ratios."""
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    if args.task == "text":
        write_jsonl(root / "reviews.jsonl", classification_rows(args.rows, seed=0, noise=0.05))
        save_tiny_bert(
            root / "teacher", head="sequence-classification", layers=4, hidden=args.hidden, heads=4
        )
    data_dir = args.data_dir or root / "data"
    sizes = (1, args.world_size)
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    for round_index in range(args.rounds):
        for size in sizes:
            torch.set_num_threads(args.threads)  # one rank: all the budget; ranks: spawned with budget/size
            spec = job_spec(
                task=args.task,
                epochs=args.epochs,
                batch_size=args.batch_size,
                world_size=size,
                device=args.device,
                seq=args.seq,
            )
            runs[size].append(one_run(root, spec, round_index, data_dir))
            print(f"round {round_index + 1} world_size {size}: {runs[size][-1]}", flush=True)
    medians = {
        size: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for size, rows in runs.items()
    }
    one, many = medians[1], medians[args.world_size]
    return {
        "device": args.device,
        "task": args.task,
        "rows": args.rows if args.task == "text" else None,
        "epochs": args.epochs,
        "global_batch": args.batch_size,
        "threads_budget": args.threads,
        "rounds": args.rounds,
        "world_sizes": list(sizes),
        "median": {str(size): values for size, values in medians.items()},
        "to_trained_ratio_many_over_one": many["to_trained_s"] / one["to_trained_s"],
        "training_ratio_many_over_one": many["training_s"] / one["training_s"],
        "runs": {str(size): rows for size, rows in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--task", choices=("text", "digits"), default=None, help="default: text (smoke: digits)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="DATA_DIR (digits: where its teacher is)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads in all (split by rank)")
    parser.add_argument("--smoke", action="store_true", help="a few rows, one round, one epoch (seconds)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.epochs, args.rounds, args.hidden, args.seq = 96, 1, 1, 32, 16
        args.task = args.task or "digits"
    args.task = args.task or "text"
    summary = measure(args)
    one, many = summary["median"]["1"], summary["median"][str(args.world_size)]
    print(
        f"{args.task} on {args.device}: world_size 1 trained after {one['to_trained_s']:.1f} s (training "
        f"{one['training_s']:.1f} s); world_size {args.world_size} after {many['to_trained_s']:.1f} s "
        f"(training {many['training_s']:.1f} s): "
        f"x{summary['to_trained_ratio_many_over_one']:.2f} to trained, "
        f"x{summary['training_ratio_many_over_one']:.2f} training"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
