"""Image preprocessing and augmentation as torch ops (no torchvision): resize, centre crop, normalise,
random resized crop, horizontal flip.

`Preprocessing` is read from the teacher's `preprocessor_config.json` (the keys transformers' image processors
write: size / crop_size / crop_pct / rescale_factor / image_mean / image_std) or given in the job
(`image_config.preprocessing`, required for a `.pt2` teacher), so teacher and student see images the way the
teacher was trained on them. Images are stored resized and cropped as uint8 (N, C, H, W); rescaling and
normalisation happen per batch (`normalise`), which keeps a split 4x smaller than float pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.schemas.job_spec import ImageAugmentation, ImagePreprocessing
from workers.distill.contract import EngineError

# PIL resample codes transformers stores in `resample` -> interpolate modes (antialiased like PIL).
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Preprocessing:
    """Resolved preprocessing: the model's input size and how pixels get there."""

    height: int
    width: int
    resize_shortest_edge: int | None  # None: resize straight to (height, width)
    rescale_factor: float  # uint8 -> [0, 1] usually (1/255)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int  # 3 RGB | 1 greyscale
    mode: str = "bilinear"  # interpolate mode
    source: str = "job"  # "job" | "teacher processor" | "teacher config"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_spec(cls, given: ImagePreprocessing) -> Preprocessing:
        return cls(
            height=given.size[0],
            width=given.size[1],
            resize_shortest_edge=given.resize_shortest_edge,
            rescale_factor=given.rescale_factor,
            mean=_per_channel(given.mean, given.channels),
            std=_per_channel(given.std, given.channels),
            channels=given.channels,
        )


def _per_channel(values: list[float] | tuple[float, ...], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values


def _side(value: Any, key: str) -> int | None:
    """An int size from a processor config entry (int or {key: int})."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and isinstance(value.get(key), int):
        return int(value[key])
    return None


def from_processor_config(processor: dict[str, Any], *, channels: int) -> Preprocessing:
    """The transformers image-processor dict (preprocessor_config.json) as `Preprocessing`.

    size {height, width}: resize to it. size {shortest_edge}: with a centre crop (crop_size), resize the
    shorter side then crop; ConvNeXt-style crop_pct below 384 px resizes the shorter side to
    shortest_edge / crop_pct and crops shortest_edge (as ConvNextImageProcessor does).
    """
    size = processor.get("size")
    crop = processor.get("crop_size")
    do_crop = bool(processor.get("do_center_crop", crop is not None))
    height = _side(size, "height")
    width = _side(size, "width")
    shortest = _side(size, "shortest_edge")
    resize_to: int | None = None
    if height is not None and width is not None:
        if do_crop and crop is not None:
            resize_to = None  # resize to size, then crop
            ch, cw = _side(crop, "height"), _side(crop, "width")
            if ch is None or cw is None:
                raise EngineError("teacher_invalid", f"unreadable crop_size in the image processor: {crop}")
            if (ch, cw) != (height, width):
                resize_to = min(height, width)
            height, width = ch, cw
    elif shortest is not None:
        if do_crop and crop is not None:
            ch, cw = _side(crop, "height"), _side(crop, "width")
            if ch is None or cw is None:
                raise EngineError("teacher_invalid", f"unreadable crop_size in the image processor: {crop}")
            resize_to, height, width = shortest, ch, cw
        elif processor.get("crop_pct") is not None and shortest < 384:
            resize_to, height, width = int(shortest / float(processor["crop_pct"])), shortest, shortest
        else:
            height = width = shortest
    else:
        raise EngineError("teacher_invalid", f"the teacher's image processor has no usable size: {size}")
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    if processor.get("do_normalize", True):
        mean = _per_channel(processor.get("image_mean", [0.5]), channels)
        std = _per_channel(processor.get("image_std", [0.5]), channels)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    if len(mean) != channels or len(std) != channels:
        raise EngineError(
            "teacher_invalid", f"image processor mean/std have {len(mean)} values for {channels} channels"
        )
    return Preprocessing(
        height=int(height),
        width=int(width),
        resize_shortest_edge=resize_to,
        rescale_factor=rescale,
        mean=mean,
        std=std,
        channels=channels,
        mode=_RESAMPLE_MODES.get(int(processor.get("resample", 2)), "bilinear"),
        source="teacher processor",
    )


def resize_and_crop(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(C, h, w) uint8 -> (C, H, W) uint8 at the model's input size (antialiased resize, centre crop)."""
    pixels = image.unsqueeze(0).float()  # (1, C, h, w)
    _, _, h, w = pixels.shape
    if prep.resize_shortest_edge is not None:
        scale = prep.resize_shortest_edge / min(h, w)
        target = (max(prep.height, round(h * scale)), max(prep.width, round(w * scale)))
    else:
        target = (prep.height, prep.width)
    if target != (h, w):
        antialias = prep.mode in ("bilinear", "bicubic")
        pixels = F.interpolate(pixels, size=target, mode=prep.mode, antialias=antialias)
    top = (pixels.shape[2] - prep.height) // 2
    left = (pixels.shape[3] - prep.width) // 2
    pixels = pixels[:, :, top : top + prep.height, left : left + prep.width]
    return pixels.round().clamp(0, 255).to(torch.uint8)[0]


def normalise(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 model input: x * rescale_factor, then (x - mean) / std per channel."""
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.float() * prep.rescale_factor - mean) / std


def augment(pixels: torch.Tensor, options: ImageAugmentation, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop and/or horizontal flip of a (B, C, H, W) float batch, one draw per image.

    Both are one affine resampling (`grid_sample`) of the batch: a crop of area fraction in crop_scale and
    aspect ratio in [3/4, 4/3] (as in Inception/torchvision's RandomResizedCrop), scaled back to (H, W).
    """
    batch = pixels.shape[0]
    scale_x = torch.ones(batch)
    scale_y = torch.ones(batch)
    shift_x = torch.zeros(batch)
    shift_y = torch.zeros(batch)
    if options.random_resized_crop:
        low, high = options.crop_scale
        area = low + (high - low) * torch.rand(batch, generator=generator)
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(
            batch, generator=generator
        )
        ratio = log_ratio.exp()
        scale_x = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        scale_y = (area / ratio).sqrt().clamp(max=1.0)
        shift_x = (1 - scale_x) * (2 * torch.rand(batch, generator=generator) - 1)
        shift_y = (1 - scale_y) * (2 * torch.rand(batch, generator=generator) - 1)
    if options.horizontal_flip:
        flip = torch.rand(batch, generator=generator) < 0.5
        scale_x = torch.where(flip, -scale_x, scale_x)
    theta = torch.zeros(batch, 2, 3)  # output grid (-1..1) -> input coordinates
    theta[:, 0, 0] = scale_x
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = scale_y
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
