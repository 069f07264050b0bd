"""KD throughput on a GPU: our trainer vs a plain PyTorch loop, BERT-base-sized teacher -> 4-layer student.

Both loops run the same models, batches and steps: bf16 autocast, pinned host batches copied with
non_blocking, AdamW, teacher frozen under inference mode (no cache: the teacher runs every step), loss =
alpha * KL(T) * T^2 + (1 - alpha) * CE. Rounds are interleaved and the median samples/s reported.
On a machine without CUDA, `--smoke` runs a tiny version on the CPU to check the script itself.

    python bench/gpu.py                      # CUDA: BERT-base (12 x 768) teacher, 4 x 768 student, seq 128
    python bench/gpu.py --compile            # also torch.compile the student (both loops)
    python bench/gpu.py --smoke              # CPU, tiny models, a few steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel

from app.schemas.job_spec import JobSpec
from workers.distill.contract import NullCallbacks, StopChecker
from workers.distill.kernel import TaskData, TensorDictDataset, iterate_batches, to_device
from workers.distill.loop import Progressor, RunPlan, train_run
from workers.distill.tasks.transformers.adapters import SequenceClassificationAdapter
from workers.distill.tasks.transformers.models import (
    count_parameters,
    initialise_from_teacher,
    student_config,
)

TEMPERATURE = 4.0
ALPHA = 0.7


def build_models(smoke: bool, attn: str) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A random-init BERT-base-sized classifier and a 4-layer student initialised from it."""
    if smoke:
        config = BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256
        )
    else:
        config = BertConfig()  # bert-base-uncased shape: 12 x 768, 12 heads, 3072, vocab 30522
    config.num_labels = 2
    config._attn_implementation = attn
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(config).eval()
    layers = 2 if smoke else 4
    small = student_config(
        config,
        layers=layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        intermediate=config.intermediate_size,
    )
    student = BertForSequenceClassification(small)
    initialise_from_teacher(student, teacher)
    return teacher, student


def make_data(samples: int, seq: int, vocab: int) -> TaskData:
    """Random token batches (the throughput does not depend on the text)."""
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorDictDataset:
        return TensorDictDataset(
            {
                "input_ids": torch.randint(5, vocab, (n, seq), generator=generator),
                "attention_mask": torch.ones(n, seq, dtype=torch.long),
                "labels": torch.randint(0, 2, (n,), generator=generator),
            }
        )

    small = split(8)
    return TaskData(train=split(samples), val=small, test=small, collate=None, num_labels=2)


def pinned(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Page-locked host copies, so the host-to-device copy can overlap compute."""
    if device.type != "cuda":
        return batch
    return {key: value.pin_memory() for key, value in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    teacher: nn.Module, student: nn.Module, data: TaskData, device: torch.device, batch_size: int, lr: float
) -> float:
    """A minimal hand-written KD epoch; returns samples per second."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    student.train()
    generator = torch.Generator().manual_seed(1)
    synchronize(device)
    started = time.perf_counter()
    samples = 0
    for _, cpu_batch in iterate_batches(data.train, batch_size, None, generator=generator):
        batch = to_device(pinned(cpu_batch, device), device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.inference_mode():
                teacher_logits = teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            soft = F.kl_div(
                F.log_softmax(logits.float() / TEMPERATURE, dim=-1),
                F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            loss = ALPHA * soft * TEMPERATURE**2 + (1 - ALPHA) * F.cross_entropy(
                logits.float(), batch["labels"]
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += batch["labels"].shape[0]
    synchronize(device)
    return samples / (time.perf_counter() - started)


def our_trainer(
    teacher: nn.Module, student: nn.Module, data: TaskData, device: torch.device, batch_size: int, lr: float
) -> float:
    """One epoch of workers.distill.trainer.train_run (cache off); returns samples per second."""
    spec = JobSpec.model_validate(
        {
            "teacher_model_name": "bert-base",
            "task": "sequence-classification",
            "dataset_config": {"kind": "file", "path": "unused.jsonl"},
            "training_config": {
                "epochs": 1,
                "batch_size": batch_size,
                "learning_rate": lr,
                "temperature": TEMPERATURE,
                "alpha": ALPHA,
                "teacher_cache": "off",
            },
        }
    )
    adapter = SequenceClassificationAdapter()
    plan = RunPlan(
        "distill", 1, 0.3, TEMPERATURE, ALPHA, 1, adapter.loss_weights(spec, temperature=4, alpha=ALPHA)
    )
    callbacks = NullCallbacks()
    steps = -(-len(data.train) // batch_size)
    synchronize(device)
    started = time.perf_counter()
    train_run(
        plan=plan,
        student=student,
        teacher=teacher,
        adapter=adapter,
        data=data,
        spec=spec,
        device=device,
        callbacks=callbacks,
        progressor=Progressor(callbacks, 0.0, 1.0, steps),
        checkpoint=lambda payload: None,
        resume_from=None,
        stopper=StopChecker(callbacks),
    )
    synchronize(device)
    return len(data.train) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=64 * 60, help="samples per measured epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student in both loops")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device here: run with --smoke for the CPU check")
    if args.smoke:
        args.batch_size, args.seq, args.samples, args.rounds = 8, 16, 48, 2
        torch.set_num_threads(2)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    teacher, fresh_student = build_models(args.smoke, attn="sdpa")
    teacher.to(device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    data = make_data(args.samples, args.seq, teacher.config.vocab_size)

    def student_copy() -> nn.Module:
        student = BertForSequenceClassification(fresh_student.config)
        student.load_state_dict(fresh_student.state_dict())
        student.to(device)
        if args.compile:
            student.compile(dynamic=False)
        return student

    # Warm-up (CUDA context, kernels, compile) for both loops, not measured.
    warm = make_data(args.batch_size * 3, args.seq, teacher.config.vocab_size)
    plain_loop(teacher, student_copy(), warm, device, args.batch_size, 1e-4)
    our_trainer(teacher, student_copy(), warm, device, args.batch_size, 1e-4)

    results: dict[str, list[float]] = {"plain": [], "ours": []}
    for _ in range(args.rounds):  # interleaved rounds: drift hits both alike
        results["plain"].append(plain_loop(teacher, student_copy(), data, device, args.batch_size, 1e-4))
        results["ours"].append(our_trainer(teacher, student_copy(), data, device, args.batch_size, 1e-4))
    plain, ours = statistics.median(results["plain"]), statistics.median(results["ours"])
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(fresh_student),
        "batch_size": args.batch_size,
        "seq": args.seq,
        "samples_per_round": args.samples,
        "compile": args.compile,
        "plain_samples_per_s": plain,
        "ours_samples_per_s": ours,
        "ratio_ours_over_plain": ours / plain,
        "rounds": results,
    }
    print(
        f"device {summary['device']}: teacher {summary['teacher_parameters']:,} params, "
        f"student {summary['student_parameters']:,}, batch {args.batch_size} x seq {args.seq}, "
        f"bf16 autocast {'on' if device.type == 'cuda' else 'off (CPU)'}"
    )
    print(f"  plain PyTorch KD loop : {plain:10.1f} samples/s")
    print(f"  distillery trainer    : {ours:10.1f} samples/s   (ratio {ours / plain:.3f})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
