"""Image data: image folders, CSV/JSONL of path,label, and Hugging Face image datasets; decoded with Pillow.

Sources (the job's `dataset_config`, and its optional `validation` / `test`):
- a directory of class folders (`<root>/<class>/*.png|jpg|...`), or of `train/`, `val|validation/`, `test/`
  folders each holding class folders (the splits are then taken as given);
- a CSV/TSV/JSONL file with an image-path column (`image_config.image_column`, default `path`) and
  `label_column`; relative paths are relative to the file, and every path must stay under the allowed root;
- a `datasets` directory written by `save_to_disk`, or a hub dataset (`kind: hub`), with an Image column
  (default `image`) and a label column (a ClassLabel's names are kept).
Reading is cheap (paths and labels); decoding happens once the preprocessing is known (the teacher's), into
uint8 (N, C, H, W) at the model's input size. A file that is not a readable image, or whose mode cannot be
converted, fails the job naming the file.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from app.core.paths import PathKind
from app.schemas.job_spec import (
    FileSource,
    HubSource,
    ImageAugmentation,
    JobSpec,
    UploadedSource,
)
from workers.distill.contract import EngineError, resolve_local_path
from workers.distill.kernel import Batch, TensorDictDataset
from workers.distill.tasks.vision.preprocess import Preprocessing, augment, normalise, resize_and_crop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}
# Pillow modes converted to RGB / L; others (32-bit int or float greyscale, 16-bit) are refused by name.
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La"}
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class ImageRecords:
    """One split before decoding: where each image is (a path, bytes or a PIL image), its name, its label."""

    items: list[Any]
    names: list[str]  # for error messages: the file path or "<dataset> row <n>"
    labels: list[Any]  # raw labels (class names or ints), mapped to ids by `ImageSplits`


@dataclass
class ImageSplits:
    """The job's three splits, labels as ids 0..K-1 (`label_names[id]` when labels were names)."""

    train: ImageRecords
    val: ImageRecords
    test: ImageRecords
    label_names: list[str] | None
    num_labels: int
    description: dict[str, Any] = field(default_factory=dict)


def _image_column(spec: JobSpec, default: str) -> str:
    return (spec.image_config.image_column if spec.image_config else None) or default


def _read_image_folder(root: Path) -> ImageRecords:
    """`root/<class>/*.<image>`: labels are the class folder names."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[Any] = []
    labels: list[Any] = []
    for folder in classes:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append(path)
                labels.append(folder.name)
    if not items:
        raise EngineError(
            "dataset_invalid",
            f"{root} holds no images in class folders (expected <class>/*.png|jpg|jpeg|bmp|gif|webp)",
        )
    return ImageRecords(items=items, names=[str(p) for p in items], labels=labels)


def _read_table(path: Path, image_column: str, label_column: str, file_root: Path | None) -> ImageRecords:
    """A CSV/TSV/JSONL of image paths and labels; each path resolved under the allowed root."""
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix in (".jsonl", ".ndjson", ".json"):
                rows = [json.loads(line) for line in handle if line.strip()]
            elif suffix in (".csv", ".tsv"):
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
            else:
                raise EngineError(
                    "dataset_invalid",
                    f"{path.name}: expected an image folder, a .csv/.tsv/.jsonl of {image_column},"
                    f"{label_column}, or a save_to_disk directory",
                )
    except UnicodeDecodeError as exc:
        raise EngineError("dataset_invalid", f"{path.name} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise EngineError("dataset_invalid", f"{path.name}: invalid JSON on a line: {exc}") from exc
    items: list[Any] = []
    labels: list[Any] = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise EngineError("dataset_invalid", f"{path.name} row {number} is not an object")
        absent = [c for c in (image_column, label_column) if row.get(c) in (None, "")]
        if absent:
            raise EngineError(
                "dataset_invalid", f"{path.name} row {number} lacks column(s) {', '.join(absent)}"
            )
        location = Path(str(row[image_column]))
        if not location.is_absolute():
            location = path.parent / location
        try:
            resolved = resolve_local_path(
                str(location), file_root, kind=PathKind.file, what="image", missing_code="dataset_invalid"
            )
        except EngineError as exc:
            raise EngineError(exc.code, f"{path.name} row {number}: {exc.message}") from exc
        items.append(resolved)
        labels.append(row[label_column])
    if not items:
        raise EngineError("dataset_invalid", f"{path.name} has no rows")
    return ImageRecords(items=items, names=[str(p) for p in items], labels=labels)


def _from_hf_table(table: Any, where: str, image_column: str, label_column: str) -> ImageRecords:
    """Rows of a `datasets.Dataset` with an Image column (PIL images / {bytes, path}) and labels."""
    absent = [c for c in (image_column, label_column) if c not in table.column_names]
    if absent:
        raise EngineError(
            "dataset_invalid", f"{where} lacks column(s) {', '.join(absent)}; has {table.column_names}"
        )
    feature = table.features.get(label_column)
    names = list(getattr(feature, "names", None) or [])
    labels = list(table[label_column])
    if names:  # a ClassLabel: keep the class names, so they line up with the teacher's id2label
        labels = [names[int(i)] for i in labels]
    items = list(table[image_column])
    return ImageRecords(items=items, names=[f"{where} row {i}" for i in range(len(items))], labels=labels)


def _datasets_module() -> Any:
    try:
        return importlib.import_module("datasets")
    except ModuleNotFoundError as exc:
        raise EngineError("unsupported", "Hugging Face datasets need the 'datasets' package") from exc


def _read_source(
    source: FileSource | HubSource | UploadedSource, spec: JobSpec, *, file_root: Path | None
) -> ImageRecords | dict[str, ImageRecords]:
    """One source's records, or {'train'|'val'|'test': records} for a folder of split folders."""
    if isinstance(source, UploadedSource):
        raise EngineError(
            "dataset_unresolved", "an 'uploaded' dataset is resolved to its file by the service"
        )
    if isinstance(source, HubSource):
        datasets = _datasets_module()
        try:
            table = datasets.load_dataset(
                source.name, source.subset, split=source.split, revision=source.revision
            )
        except Exception as exc:  # the hub raises many types (network, missing split, auth); all reported
            raise EngineError(
                "dataset_invalid", f"hub dataset '{source.name}' could not be loaded: {exc}"
            ) from exc
        return _from_hf_table(
            table, f"hub dataset '{source.name}'", _image_column(spec, "image"), source.label_column
        )
    path = resolve_local_path(
        source.path, file_root, kind=PathKind.any, what="dataset", missing_code="dataset_invalid"
    )
    if path.is_file():
        return _read_table(path, _image_column(spec, "path"), source.label_column, file_root)
    if any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        datasets = _datasets_module()
        try:
            table = datasets.load_from_disk(str(path))
        except Exception as exc:  # corrupt or foreign directories raise many types; all reported
            raise EngineError(
                "dataset_invalid", f"{path} could not be read by datasets.load_from_disk: {exc}"
            ) from exc
        if isinstance(table, datasets.DatasetDict):
            splits = {}
            for key, aliases in _SPLIT_DIRS.items():
                name = next((a for a in aliases if a in table), None)
                if name is not None:
                    splits[key] = _from_hf_table(
                        table[name], f"{path.name}[{name}]", _image_column(spec, "image"), source.label_column
                    )
            if "train" not in splits:
                raise EngineError("dataset_invalid", f"{path} has no 'train' split; has {list(table)}")
            return splits
        return _from_hf_table(table, path.name, _image_column(spec, "image"), source.label_column)
    split_dirs = {
        key: next((path / a for a in aliases if (path / a).is_dir()), None)
        for key, aliases in _SPLIT_DIRS.items()
    }
    if split_dirs["train"] is not None:
        return {key: _read_image_folder(folder) for key, folder in split_dirs.items() if folder is not None}
    return _read_image_folder(path)


def _as_records(read: ImageRecords | dict[str, ImageRecords], what: str) -> ImageRecords:
    if isinstance(read, dict):
        if set(read) != {"train"}:
            raise EngineError("dataset_invalid", f"the {what} dataset must be one split, not {sorted(read)}")
        return read["train"]
    return read


def _subset(records: ImageRecords, indices: Sequence[int]) -> ImageRecords:
    ordered = sorted(int(i) for i in indices)  # dataset order, independent of the split's shuffling
    return ImageRecords(
        items=[records.items[i] for i in ordered],
        names=[records.names[i] for i in ordered],
        labels=[records.labels[i] for i in ordered],
    )


def _carve(records: ImageRecords, fraction: float, labels: list[int]) -> tuple[ImageRecords, ImageRecords]:
    """(rest, held-out `fraction`), stratified by label (at least one image of each class held out when the
    data allow, else unstratified), deterministic."""
    indices = np.arange(len(records.items))
    classes = len(set(labels))
    held_size = max(1, round(fraction * len(indices)))
    stratify: list[int] | None = labels
    if held_size < classes:
        if len(indices) - classes >= classes and min(np.bincount(labels)) >= 2:
            held_size = classes
        else:
            stratify = None
    if held_size >= len(indices):
        raise EngineError(
            "dataset_invalid", f"{len(indices)} images are too few to split into train/val/test"
        )
    try:
        rest, held = train_test_split(indices, test_size=held_size, random_state=0, stratify=stratify)
    except ValueError:  # a class with a single image cannot be stratified: split without
        rest, held = train_test_split(indices, test_size=held_size, random_state=0)
    return _subset(records, rest), _subset(records, held)


def label_ids(raw: list[Any], names: list[str] | None) -> list[int]:
    """Raw labels as ids: by `names` (class names) or as integers 0..K-1."""
    if names is not None:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in raw} - set(index))
        if unknown:
            raise EngineError(
                "dataset_invalid", f"labels {unknown[:5]} are not among the classes {names[:10]}"
            )
        return [index[str(v)] for v in raw]
    return [int(v) for v in raw]


def _label_space(raw: list[Any]) -> tuple[list[str] | None, int]:
    """(class names in sorted order, or None for integer labels 0..K-1; number of classes)."""
    try:
        numeric = [int(str(v).strip()) for v in raw]
        if any(str(v).strip() != str(n) for v, n in zip(raw, numeric, strict=True)):
            raise ValueError
    except ValueError:
        names = sorted({str(v) for v in raw})
        return names, len(names)
    if min(numeric) < 0:
        raise EngineError("dataset_invalid", f"labels must be >= 0, found {min(numeric)}")
    return None, max(numeric) + 1


def read_image_splits(spec: JobSpec, *, file_root: Path | None) -> ImageSplits:
    """The job's images and labels, split 80/10/10 (stratified, deterministic) unless splits are given."""
    config = spec.dataset_config
    if not isinstance(config, FileSource | HubSource | UploadedSource):
        raise EngineError("dataset_invalid", "task 'image-classification' needs a 'file' or 'hub' dataset")
    main = _read_source(config, spec, file_root=file_root)
    given = dict(main) if isinstance(main, dict) else {"train": main}
    validation = getattr(config, "validation", None)
    test = getattr(config, "test", None)
    if validation is not None:
        given["val"] = _as_records(_read_source(validation, spec, file_root=file_root), "validation")
    if test is not None:
        given["test"] = _as_records(_read_source(test, spec, file_root=file_root), "test")
    names, num_labels = _label_space(given["train"].labels)
    if num_labels < 2:
        raise EngineError("dataset_invalid", "image classification needs at least 2 classes")
    train = given["train"]
    carved: list[str] = []
    if "test" not in given:
        train, given["test"] = _carve(train, 0.1, label_ids(train.labels, names))
        carved.append("test")
    if "val" not in given:
        train, given["val"] = _carve(train, 1 / 9 if carved else 0.1, label_ids(train.labels, names))
        carved.append("val")
    for key, records in (("train", train), ("val", given["val"]), ("test", given["test"])):
        if not records.items:
            raise EngineError("dataset_invalid", f"the {key} split has no images")
    return ImageSplits(
        train=train,
        val=given["val"],
        test=given["test"],
        label_names=names,
        num_labels=num_labels,
        description={
            "images": {
                "train": len(train.items),
                "val": len(given["val"].items),
                "test": len(given["test"].items),
            },
            "carved_splits": carved,
        },
    )


def decode_image(item: Any, name: str, channels: int) -> torch.Tensor:
    """One image as (C, h, w) uint8; EngineError('dataset_invalid') naming `name` when it cannot be."""
    try:
        if isinstance(item, Image.Image):
            image = item
        elif isinstance(item, dict) and item.get("bytes") is not None:
            image = Image.open(io.BytesIO(item["bytes"]))
        elif isinstance(item, dict) and item.get("path"):
            image = Image.open(item["path"])
        elif isinstance(item, Path | str):
            image = Image.open(item)
        elif isinstance(item, np.ndarray):
            image = Image.fromarray(item)
        else:
            raise EngineError("dataset_invalid", f"{name}: not an image ({type(item).__name__})")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EngineError("dataset_invalid", f"{name}: not a readable image ({exc})") from exc
    if image.mode not in _CONVERTIBLE_MODES:
        raise EngineError(
            "dataset_invalid",
            f"{name}: image mode '{image.mode}' cannot be used "
            "(give 8-bit RGB, RGBA, greyscale or palette images)",
        )
    array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]  # (h, w) -> (h, w, 1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, h, w)


class ImageDataset(TensorDictDataset):
    """Stored uint8 pixels (N, C, H, W) + labels (N,); batches come out as normalised `pixel_values`."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, prep: Preprocessing) -> None:
        super().__init__({"pixels": pixels, "labels": labels})
        self.prep = prep

    def get_batch(self, indices: torch.Tensor) -> Batch:
        """pixel_values (B, C, H, W) float32, labels (B,)."""
        pixels = self.tensors["pixels"][indices]
        return {"pixel_values": normalise(pixels, self.prep), "labels": self.tensors["labels"][indices]}

    def __getitem__(self, index: int) -> Batch:
        batch = self.get_batch(torch.tensor([index]))
        return {key: value[0] for key, value in batch.items()}


class AugmentedImageDataset(ImageDataset):
    """The training split with random resized crop / flip drawn afresh for every batch.

    Not deterministic per index (that is the point), so the teacher's outputs are never cached for it
    (JobSpec turns the cache off when augmentation is on).
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        prep: Preprocessing,
        options: ImageAugmentation,
        *,
        seed: int,
    ) -> None:
        super().__init__(pixels, labels, prep)
        self.options = options
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self, indices: torch.Tensor) -> Batch:
        batch = super().get_batch(indices)
        batch["pixel_values"] = augment(batch["pixel_values"], self.options, self.generator)
        return batch


def decode_split(
    records: ImageRecords,
    names: list[str] | None,
    prep: Preprocessing,
    *,
    augmentation: ImageAugmentation | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Decode, resize and crop every image of a split once: an `ImageDataset` (augmented when asked)."""
    pixels = torch.empty(len(records.items), prep.channels, prep.height, prep.width, dtype=torch.uint8)
    for i, (item, name) in enumerate(zip(records.items, records.names, strict=True)):
        image = decode_image(item, name, prep.channels)
        pixels[i] = resize_and_crop(image, prep)
    labels = torch.tensor(label_ids(records.labels, names), dtype=torch.long)
    if augmentation is not None and augmentation.enabled:
        return AugmentedImageDataset(pixels, labels, prep, augmentation, seed=seed)
    return ImageDataset(pixels, labels, prep)
