"""Small models for the `classification` task: the digits CNN teacher and scaled MLP students.

Every model is rebuilt from `{"architecture": name, "kwargs": {...}}` (stored as `student_config.json`), so
saved weights never need pickle.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A CNN over 8x8 digit images given as flat (B, 64) vectors; returns logits and per-block features.

    Pooling comes right after the first convolution so the second one runs at 4x4: most parameters sit in
    the wide hidden layer, which is cheap to train on a CPU.
    """

    config: dict[str, Any]

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, channels: int = 16, hidden: int = 1500
    ) -> None:
        super().__init__()
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(f"DigitsCNN needs a square image, got {in_features} features")
        self.side = side
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(2 * channels * (side // 2) ** 2, hidden)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.config = {
            "in_features": in_features,
            "num_classes": num_classes,
            "channels": channels,
            "hidden": hidden,
        }

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after each block, flattened: [(B, C*S*S/4), (B, 2C*S*S/4), (B, hidden)]."""
        image = x.view(-1, 1, self.side, self.side)  # (B, 1, 8, 8)
        h1 = self.pool(torch.relu(self.conv1(image)))  # (B, C, 4, 4)
        h2 = torch.relu(self.conv2(h1))  # (B, 2C, 4, 4)
        h3 = torch.relu(self.fc1(h2.flatten(1)))  # (B, hidden)
        return [h1.flatten(1), h2.flatten(1), h3]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden = self.features(x)
        return self.fc2(self.dropout(hidden[-1])), hidden  # (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


class MLP(nn.Module):
    """A multilayer perceptron (B, in) -> (B, classes); the students of CNN/MLP teachers."""

    config: dict[str, Any]

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: list[int] | None = None) -> None:
        super().__init__()
        widths = [in_features, *(hidden or [])]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], num_classes)
        self.config = {"in_features": in_features, "num_classes": num_classes, "hidden": list(hidden or [])}

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden: list[torch.Tensor] = []
        h = x  # (B, in)
        for layer in self.layers:
            h = torch.relu(layer(h))  # (B, width)
            hidden.append(h)
        return self.head(h), hidden  # (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


class SmallCNN(nn.Module):
    """The scaled student of a CNN teacher: one conv block, then a hidden layer. (B, S*S) -> (B, classes)."""

    config: dict[str, Any]

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, channels: int = 8, hidden: int = 32
    ) -> None:
        super().__init__()
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(f"SmallCNN needs a square image, got {in_features} features")
        self.side = side
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(channels * (side // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.config = {
            "in_features": in_features,
            "num_classes": num_classes,
            "channels": channels,
            "hidden": hidden,
        }

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image = x.view(-1, 1, self.side, self.side)  # (B, 1, S, S)
        h1 = self.pool(torch.relu(self.conv(image))).flatten(1)  # (B, C*S*S/4)
        h2 = torch.relu(self.fc1(h1))  # (B, hidden)
        return self.fc2(h2), [h1, h2]  # (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "small_cnn": SmallCNN,
    "mlp": MLP,
}


def architecture_name(model: nn.Module) -> str:
    """The registry name of a model built here."""
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not one of {sorted(ARCHITECTURES)}")


def model_config(model: nn.Module) -> dict[str, Any]:
    """`{"architecture", "kwargs"}`: enough to rebuild `model` with `build_model`."""
    return {"architecture": architecture_name(model), "kwargs": dict(small_model_config(model))}


def small_model_config(model: nn.Module) -> dict[str, Any]:
    """The constructor kwargs of a DigitsCNN or MLP."""
    if not isinstance(model, DigitsCNN | SmallCNN | MLP):
        raise ValueError(f"{type(model).__name__} is not one of {sorted(ARCHITECTURES)}")
    return model.config


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from `model_config` output."""
    name = config.get("architecture")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](**config.get("kwargs", {}))


def mlp_parameters(in_features: int, num_classes: int, hidden: list[int]) -> int:
    """Parameter count of `MLP(in_features, num_classes, hidden)`."""
    widths = [in_features, *hidden, num_classes]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def scaled_mlp_hidden(in_features: int, num_classes: int, budget: int) -> list[int]:
    """Hidden widths of the largest MLP not above `budget` parameters (one hidden layer; two when large).

    One layer of width h costs (in + classes) h + h + classes; past 256 units a second layer of the same
    width is used, which keeps big stages (early progressive ones) deep enough to be worth a stage.
    """
    one_layer = max(1, (budget - num_classes) // (in_features + num_classes + 1))
    if one_layer <= 256:
        return [one_layer]
    # Two layers of width h: h^2 + (in + classes + 2) h + classes <= budget.
    b = in_features + num_classes + 2
    width = int((-b + math.sqrt(b * b + 4 * (budget - num_classes))) / 2)
    while mlp_parameters(in_features, num_classes, [width, width]) > budget:
        width -= 1
    return [max(1, width), max(1, width)]


def small_cnn_parameters(in_features: int, num_classes: int, channels: int, hidden: int) -> int:
    """Parameter count of `SmallCNN(in_features, num_classes, channels, hidden)`."""
    pooled = channels * (math.isqrt(in_features) // 2) ** 2
    return 10 * channels + pooled * hidden + hidden + hidden * num_classes + num_classes


def scaled_small_cnn(in_features: int, num_classes: int, budget: int) -> dict[str, int]:
    """Channels and hidden width of the largest SmallCNN not above `budget` parameters.

    Channels grow with the square root of the budget (8 at ~4k parameters), the hidden layer takes the rest.
    """
    pooled_per_channel = (math.isqrt(in_features) // 2) ** 2
    channels = max(2, round(math.sqrt(budget) / 8))
    while channels > 1:
        hidden = (budget - 10 * channels - num_classes) // (channels * pooled_per_channel + 1 + num_classes)
        if hidden >= 4:
            return {"channels": channels, "hidden": hidden}
        channels -= 1
    return {
        "channels": 1,
        "hidden": max(1, (budget - 10 - num_classes) // (pooled_per_channel + 1 + num_classes)),
    }
