"""Test-only builders for the image task: digits as RGB PNG class folders, tiny image classifiers, fitting.

Shared by tests/engine/test_vision*.py and bench/bench_vision.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    MobileNetV2Config,
    PreTrainedModel,
    ResNetConfig,
    ViTConfig,
)

DIGIT_NAMES = [f"digit{i}" for i in range(10)]


def write_digit_folders(
    root: Path, *, per_class: int | None = 20, size: int = 16, classes: int = 10, seed: int = 0
) -> Path:
    """sklearn's 8x8 digits scaled up to `size` x `size` RGB PNGs in `root/digit<k>/<n>.png`; returns root.

    The colour of each image varies (a random tint), so the three channels carry different values.
    """
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(range(classes), 0)
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if label >= classes or (per_class is not None and counts[label] >= per_class):
            continue
        grey = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        tint = rng.uniform(0.6, 1.0, size=3)
        rgb = (np.asarray(grey, dtype=np.float32)[:, :, None] * tint).clip(0, 255).astype(np.uint8)
        folder = root / DIGIT_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(folder / f"{counts[label]:04d}.png")
        counts[label] += 1
    return root


def write_processor(directory: Path, size: int, *, mean: float = 0.5, std: float = 0.5) -> None:
    """A ViT-style preprocessor_config.json (exact resize to size x size, rescale 1/255, mean/std)."""
    config = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [mean] * 3,
        "image_std": [std] * 3,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config))


def tiny_config(family: str, *, num_labels: int = 10, size: int = 16, labels: list[str] | None = None) -> Any:
    """Tiny configs of the three families the tests use."""
    names = labels or DIGIT_NAMES[:num_labels]
    label_kwargs = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if family == "resnet":
        return ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[2, 1], layer_type="basic", **label_kwargs
        )
    if family == "vit":
        return ViTConfig(
            image_size=size,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            **label_kwargs,
        )
    if family == "mobilenet_v2":
        return MobileNetV2Config(image_size=size, depth_multiplier=0.5, **label_kwargs)
    raise ValueError(family)


def images_and_labels(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under root's class folders as normalised (N, 3, size, size) (mean/std 0.5) + labels."""
    pixels, labels = [], []
    for label, name in enumerate(DIGIT_NAMES):
        for path in sorted((root / name).glob("*.png")):
            array = np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.float32)
            pixels.append(torch.from_numpy(array).permute(2, 0, 1) / 255)
            labels.append(label)
    x = (torch.stack(pixels) - 0.5) / 0.5
    return x, torch.tensor(labels)


def fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 15, lr: float = 3e-3, seed: int = 0
) -> float:
    """Train a classifier on (x, y) with AdamW; returns its training accuracy."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            idx = order[start : start + 32]
            out = model(pixel_values=x[idx]) if isinstance(model, PreTrainedModel) else model(x[idx])
            logits = out.logits if isinstance(model, PreTrainedModel) else out
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=x) if isinstance(model, PreTrainedModel) else model(x)
        logits = out.logits if isinstance(model, PreTrainedModel) else out
    return float((logits.argmax(-1) == y).float().mean())


def save_fitted_teacher(
    family: str, directory: Path, images: Path, *, size: int = 16, epochs: int = 15, seed: int = 0
) -> float:
    """A tiny `family` classifier fitted on the digit folders, saved with save_pretrained + processor."""
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(tiny_config(family, size=size))
    x, y = images_and_labels(images, size)
    accuracy = fit(model, x, y, epochs=epochs, seed=seed)
    model.save_pretrained(directory)
    write_processor(directory, size)
    return accuracy


class PlainCNN(nn.Module):
    """A plain CNN (no transformers): what a torchvision/timm model looks like to the engine."""

    def __init__(self, num_labels: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_program_teacher(path: Path, images: Path, *, size: int = 16, epochs: int = 15) -> float:
    """A PlainCNN fitted on the digit folders and saved as a torch.export program (dynamic batch)."""
    torch.manual_seed(0)
    model = PlainCNN()
    x, y = images_and_labels(images, size)
    accuracy = fit(model, x, y, epochs=epochs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return accuracy
