"""Language-model KD on a small language made here: two-digit addition, digit by digit.

"4 7 + 1 9 =" -> "6 6 ." : a GPT-2 teacher is trained here (cross-entropy) on sums disjoint from the job's
data, then each job distils it into a derived student through `run_job` (the code the workers run) with
prompt/completion rows, so the loss and the perplexity are on the answer tokens only. The grid is
`lm_loss` x `on_policy_fraction` (0 / 0.5), plus the labels-only baseline (alpha 0: the same student on the
data alone) and sequence-level KD. The off-policy jobs share one teacher-signal cache: the first builds it
(miss), the others hit it; the table reports its bytes per token and the teacher seconds each hit saved.

    .venv/bin/python bench/bench_lm.py                      # the figures in bench/README.md
    .venv/bin/python bench/bench_lm.py --rows 600 --epochs 2 --teacher-steps 200   # a quick smoke

Figures: test-split perplexity of the delivered student (lower is better), next-token agreement with the
teacher on test (higher is better), training seconds (noisy on a shared machine: report `uptime`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.config import EngineConfig
from workers.distill.contract import JobPaths
from workers.distill.runner import run_job

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
EOS = "<|endoftext|>"


def addition_pairs(seed: int) -> list[tuple[str, str]]:
    """Every a + b (a, b < 100) as (prompt, completion) digit strings, shuffled."""
    pairs = [
        (f"{' '.join(str(a))} + {' '.join(str(b))} =", f"{' '.join(str(a + b))} .")
        for a in range(100)
        for b in range(100)
    ]
    random.Random(seed).shuffle(pairs)
    return pairs


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([EOS, *"0123456789", "+", "=", "."])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def train_teacher(directory: Path, pairs: list[tuple[str, str]], *, steps: int, seed: int) -> float:
    """A 4-layer, 64-wide GPT-2 trained on `pairs` (answer tokens only); returns its training seconds."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=64, n_layer=4, n_head=4,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([f"{c} {EOS}" for _, c in pairs], add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(pairs), width), eos)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    model.train()
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(pairs), (64,), generator=generator)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(
                f"teacher step {step}/{steps}: loss {float(loss):.3f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return time.monotonic() - started


def job_spec(data: str, args: argparse.Namespace, **training: Any) -> JobSpec:
    config: dict[str, Any] = {
        "epochs": args.epochs, "batch_size": 32, "learning_rate": 2e-3, "temperature": 1.0, "alpha": 0.7,
        "max_seq_length": 32, "teacher_cache": "on", "teacher_cache_top_k": args.top_k, "max_new_tokens": 4,
        "select": "best_validation", "seed": args.job_seed if args.job_seed is not None else args.seed,
    }  # fmt: skip
    config.update(training)
    return JobSpec.model_validate(
        {
            "teacher_model_name": "adder",
            "task": "causal-lm",
            "target_compression": args.compression,
            "dataset_config": {"kind": "file", "path": data},
            "training_config": config,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=800, help="rows of the job's data (80/10/10 split)")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compression", type=float, default=0.25)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="data split and teacher")
    parser.add_argument("--job-seed", type=int, default=None, help="the jobs' training seed (default --seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every job's figures here")
    parser.add_argument(
        "--teacher-dir", type=Path, default=None, help="reuse a teacher this bench trained before (same seed)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    pairs = addition_pairs(args.seed)
    job_rows, teacher_rows = pairs[: args.rows], pairs[args.rows :]
    (root / "adder.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in job_rows)
    )
    if args.teacher_dir is not None and (args.teacher_dir / "config.json").is_file():
        shutil.copytree(args.teacher_dir, root / "adder")
        print(f"teacher reused from {args.teacher_dir}", flush=True)
    else:
        seconds = train_teacher(root / "adder", teacher_rows, steps=args.teacher_steps, seed=args.seed)
        print(f"teacher trained on {len(teacher_rows)} other sums in {seconds:.0f} s", flush=True)
    source = TeacherSource(name="adder", kind=TeacherSourceKind.local, location="adder", type="transformer")
    engine = EngineConfig(signal_cache_dir=root / "data", signal_cache_owner="bench")

    runs: list[tuple[str, JobSpec]] = [("labels only (alpha 0)", job_spec("adder.jsonl", args, alpha=0.0))]
    for fraction in (0.0, 0.5):
        for divergence in DIVERGENCES:
            spec = job_spec("adder.jsonl", args, lm_loss=divergence, on_policy_fraction=fraction)
            runs.append((f"{divergence} / {fraction}", spec))
    runs.append(("sequence_kd", job_spec("adder.jsonl", args, sequence_kd=True)))

    rows: list[dict[str, Any]] = []
    teacher_ppl = 0.0
    for index, (label, spec) in enumerate(runs):
        results = run_job(
            spec, teacher=source, paths=JobPaths(root / f"job-{index}"), data_dir=root / "data",
            file_root=root, config=engine,
        )  # fmt: skip
        teacher_ppl = results.teacher_accuracy
        cache = results.teacher_signal_cache or {}
        row = {
            "run": label,
            "perplexity": results.student_accuracy,
            "agreement": results.teacher_agreement,
            "seconds": results.training_seconds,
            "cache": cache.get("status", "-"),
            "cache_bytes_per_token": cache.get("bytes_per_token"),
            "teacher_seconds": cache.get("teacher_seconds"),
            "teacher_seconds_saved": cache.get("teacher_seconds_saved"),
            "initial_perplexity": results.initial_student_accuracy,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nteacher test perplexity {teacher_ppl:.3f}; student {args.compression} of its parameters; "
          f"{args.rows} rows, {args.epochs} epochs, top-k {args.top_k}\n")  # fmt: skip
    print(
        "| lm_loss / on_policy_fraction | student ppl (test, lower better) | agreement (test) | s | cache |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        agreement = f"{row['agreement']:.3f}" if row["agreement"] is not None else "-"
        figures = f"{row['perplexity']:.3f} | {agreement} | {row['seconds']:.1f} | {row['cache']}"
        print(f"| {row['run']} | {figures} |")
    stored = [r for r in rows if r["cache"] in ("miss", "hit")]
    if stored:
        miss = next(r for r in stored if r["cache"] == "miss")
        hits = [r for r in stored if r["cache"] == "hit"]
        print(f"\ncache: {miss['cache_bytes_per_token']:.1f} bytes/token (top-{args.top_k}); teacher pass "
              f"{miss['teacher_seconds']:.2f} s at the miss; {len(hits)} hits saved "
              f"{sum(r['teacher_seconds_saved'] for r in hits):.2f} s of teacher time in all")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"teacher_perplexity": teacher_ppl, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
