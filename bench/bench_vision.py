"""Vision KD figure: a ResNet teacher on digit images, a KD student vs a labels-only student of the same size.

The image task is made here: scikit-learn's 1,797 8x8 digits scaled to 32x32 RGB PNGs (a random tint per
image) in `train/ val/ test/` folders of class folders (80/10/10, stratified). The teacher, a small
transformers ResNet, is fitted on train/ only. For each seed the engine derives a student at
`--ratio` of the teacher's parameters (initialised from the teacher's leading slices) and trains it twice,
with the same architecture, init and schedule: with response KD and on labels only (`baseline: true`).
Reported: teacher and student test accuracy, retention, KD gain (points), parameters and latency at batch
1 / 64 (32x32 inputs, CPU). Usage: python bench/bench_vision.py [--seeds 3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import AutoModelForImageClassification, ResNetConfig

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.contract import JobPaths
from workers.distill.runner import run_job

SIZE = 32
NAMES = [f"digit{i}" for i in range(10)]


def write_images(root: Path) -> None:
    """digits -> 32x32 tinted RGB PNGs under root/{train,val,test}/digit<k>/."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    indices = np.arange(len(digits.target))
    rest, test = train_test_split(indices, test_size=0.1, random_state=0, stratify=digits.target)
    train, val = train_test_split(rest, test_size=1 / 9, random_state=0, stratify=digits.target[rest])
    for split, chosen in (("train", train), ("val", val), ("test", test)):
        for i in chosen:
            grey = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize(
                (SIZE, SIZE), Image.Resampling.BILINEAR
            )
            rgb = (np.asarray(grey, dtype=np.float32)[:, :, None] * rng.uniform(0.6, 1.0, 3)).astype(np.uint8)
            folder = root / split / NAMES[int(digits.target[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb, "RGB").save(folder / f"{i:04d}.png")


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = [], []
    for label, name in enumerate(NAMES):
        for path in sorted((root / name).glob("*.png")):
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
            pixels.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return (torch.stack(pixels) - 0.5) / 0.5, torch.tensor(labels)


def fit_teacher(root: Path, out: Path, epochs: int) -> tuple[float, float]:
    """A small ResNet fitted on train/; saved with a ViT-style processor config (32x32, mean/std 0.5)."""
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=32,
        hidden_sizes=[32, 64, 128],
        depths=[2, 2, 2],
        layer_type="basic",
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
    )
    model = AutoModelForImageClassification.from_config(config)
    x, y = load_split(root / "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * -(-len(x) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    started = time.monotonic()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    model.save_pretrained(out)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": SIZE, "width": SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    xt, yt = load_split(root / "test")
    with torch.no_grad():
        accuracy = float((model(pixel_values=xt).logits.argmax(-1) == yt).float().mean())
    return accuracy, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "digits32")
        teacher_acc, teacher_seconds = fit_teacher(root / "digits32", root / "teacher", args.teacher_epochs)
        print(f"teacher fitted: test accuracy {teacher_acc:.4f} in {teacher_seconds:.0f} s")
        rows = []
        for seed in range(args.seeds):
            spec = JobSpec.model_validate(
                {
                    "teacher_model_name": "resnet",
                    "task": "image-classification",
                    "target_compression": args.ratio,
                    "distillation_method": "response_distillation",
                    "dataset_config": {"kind": "file", "path": "digits32"},
                    "training_config": {
                        "epochs": args.epochs,
                        "batch_size": 64,
                        "learning_rate": 3e-3,
                        "temperature": 4.0,
                        "alpha": 0.7,
                        "seed": seed,
                        "device": "cpu",
                        "baseline": True,
                    },
                }
            )
            teacher = TeacherSource(
                name="resnet", kind=TeacherSourceKind.local, location="teacher", type="image_classifier"
            )
            started = time.monotonic()
            results = run_job(
                spec,
                teacher=teacher,
                paths=JobPaths(root / f"job-{seed}"),
                data_dir=root / "data",
                file_root=root,
            ).model_dump()
            rows.append(results)
            print(
                f"seed {seed}: KD {results['student_accuracy']:.4f}  "
                f"labels-only {results['baseline_accuracy']:.4f}  "
                f"gain {results['kd_gain']:+.2f} points  retention {results['accuracy_retention']:.4f}  "
                f"({time.monotonic() - started:.0f} s)"
            )

    def mean_sd(key: str) -> str:
        values = [float(r[key]) for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    first = rows[0]
    latency = first["latency_ms"]
    print()
    print(f"machine load (uptime at start): {uptime}")
    print(f"teacher: {first['original_parameters']:,} params, test accuracy {first['teacher_accuracy']:.4f}")
    print(
        f"student: {first['compressed_parameters']:,} params (ratio {first['compression_ratio']:.3f}), "
        f"config {first.get('student_derivation', {}).get('config_changes')}"
    )
    print(f"KD student test accuracy      {mean_sd('student_accuracy')}  (mean ± sd over {len(rows)} seeds)")
    print(f"labels-only test accuracy     {mean_sd('baseline_accuracy')}")
    print(f"KD gain (points, + = KD better) {mean_sd('kd_gain')}")
    print(f"retention                     {mean_sd('accuracy_retention')}")
    for role in ("teacher", "student"):
        print(
            f"latency {role}: batch 1 {latency[role]['batch_1']:.2f} ms, "
            f"batch 64 {latency[role]['batch_64']:.2f} ms"
        )
    print(f"speedup at batch 64: {first['inference_speedup']:.2f}x")


if __name__ == "__main__":
    main()
