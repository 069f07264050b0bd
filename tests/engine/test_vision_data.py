"""Image data sources, preprocessing, augmentation, derivation sizes and feature-map losses (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification

from app.schemas.job_spec import ImageAugmentation, JobSpec
from tests.engine.vision_models import DIGIT_NAMES, tiny_config, write_digit_folders
from workers.distill.contract import EngineError
from workers.distill.kernel import ModelOutputs, count_parameters
from workers.distill.losses import FeatureProjector, LossInputs, get_loss
from workers.distill.tasks.vision.data import decode_image, decode_split, read_image_splits
from workers.distill.tasks.vision.losses import attention_transfer_loss, spatial_attention
from workers.distill.tasks.vision.models import copy_from_teacher, derive_student
from workers.distill.tasks.vision.preprocess import (
    Preprocessing,
    augment,
    from_processor_config,
    normalise,
    resize_and_crop,
)

PREP = Preprocessing(
    height=16,
    width=16,
    resize_shortest_edge=None,
    rescale_factor=1 / 255,
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    channels=3,
)


def _spec(dataset: dict[str, Any], **extra: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": "image-classification",
            "dataset_config": dataset,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_folders(tmp_path_factory.mktemp("img") / "digits", per_class=10, size=12)


def test_the_images_example_is_a_valid_image_job() -> None:
    body = json.loads((Path(__file__).parents[2] / "examples" / "images.json").read_text())
    spec = JobSpec.model_validate(body)
    assert spec.task == "image-classification" and spec.training_config.baseline


def test_image_folder_is_split_by_class(digits: Path) -> None:
    splits = read_image_splits(_spec({"kind": "file", "path": "digits"}), file_root=digits.parent)
    assert splits.label_names == DIGIT_NAMES and splits.num_labels == 10
    assert (len(splits.train.items), len(splits.val.items), len(splits.test.items)) == (80, 10, 10)
    assert len({str(p) for p in splits.test.items} & {str(p) for p in splits.train.items}) == 0
    test = decode_split(splits.test, splits.label_names, PREP)
    batch = test.get_batch(torch.arange(3))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert float(batch["pixel_values"].min()) >= -1.0 and float(batch["pixel_values"].max()) <= 1.0


def test_csv_and_jsonl_of_paths_and_the_allowed_root(digits: Path, tmp_path: Path) -> None:
    rows = [
        {"path": f"digits/{name}/{i:04d}.png", "label": name} for name in DIGIT_NAMES[:3] for i in range(10)
    ]
    table = digits.parent / "images.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    splits = read_image_splits(_spec({"kind": "file", "path": "images.csv"}), file_root=digits.parent)
    assert splits.num_labels == 3 and len(splits.train.items) == 24

    lines = [{"file": row["path"], "y": DIGIT_NAMES.index(row["label"])} for row in rows]
    (digits.parent / "images.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    spec = _spec(
        {"kind": "file", "path": "images.jsonl", "label_column": "y"}, image_config={"image_column": "file"}
    )
    splits = read_image_splits(spec, file_root=digits.parent)
    assert splits.label_names is None and splits.num_labels == 3

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (digits.parent / "escape.csv").write_text(f"path,label\n{outside},a\n../x.png,b\n")
    with pytest.raises(EngineError) as info:
        read_image_splits(_spec({"kind": "file", "path": "escape.csv"}), file_root=digits.parent)
    assert info.value.code == "path_outside_root" and "row 1" in info.value.message


def test_hf_dataset_saved_to_disk_keeps_class_names(digits: Path) -> None:
    files = sorted(digits.glob("*/*.png"))
    table = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "label": [DIGIT_NAMES.index(p.parent.name) for p in files]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)}
        ),
    )
    table.save_to_disk(str(digits.parent / "hf"))
    splits = read_image_splits(_spec({"kind": "file", "path": "hf"}), file_root=digits.parent)
    assert splits.label_names == DIGIT_NAMES and len(splits.test.items) == 10
    decoded = decode_split(splits.test, splits.label_names, PREP)
    assert decoded.tensors["pixels"].shape == (10, 3, 16, 16)


def test_split_folders_and_given_test_set(digits: Path) -> None:
    root = digits.parent / "splits"
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        write_digit_folders(root / split, per_class=count, size=12, classes=3)
    splits = read_image_splits(_spec({"kind": "file", "path": "splits"}), file_root=digits.parent)
    assert (len(splits.train.items), len(splits.val.items), len(splits.test.items)) == (18, 6, 6)
    assert splits.description["carved_splits"] == []

    spec = _spec({"kind": "file", "path": "splits/train", "test": {"kind": "file", "path": "splits/test"}})
    splits = read_image_splits(spec, file_root=digits.parent)
    assert len(splits.test.items) == 6 and splits.description["carved_splits"] == ["val"]


def test_bad_images_name_the_file(digits: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(EngineError) as info:
        decode_image(broken, str(broken), 3)
    assert info.value.code == "dataset_invalid" and "broken.png" in info.value.message

    wide = tmp_path / "float.tiff"
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), mode="F").save(wide)
    with pytest.raises(EngineError) as info:
        decode_image(wide, str(wide), 3)
    assert "float.tiff" in info.value.message and "mode 'F'" in info.value.message

    # A bad file inside a class folder fails the decode naming it.
    folder = tmp_path / "set"
    write_digit_folders(folder, per_class=3, size=8, classes=2)
    (folder / "digit1" / "zz.png").write_bytes(b"garbage")
    splits = read_image_splits(_spec({"kind": "file", "path": "set"}), file_root=tmp_path)
    with pytest.raises(EngineError, match=r"zz\.png"):
        for records in (splits.train, splits.val, splits.test):
            decode_split(records, splits.label_names, PREP)


def test_processor_configs_resolve_like_transformers() -> None:
    vit = from_processor_config(
        {"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, channels=3
    )
    assert (vit.height, vit.width, vit.resize_shortest_edge) == (224, 224, None)
    convnext = from_processor_config(
        {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3}, channels=3
    )
    assert (convnext.height, convnext.resize_shortest_edge, convnext.mode) == (224, 256, "bicubic")
    mobilenet = from_processor_config(
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True},
        channels=3,
    )
    assert (mobilenet.height, mobilenet.resize_shortest_edge) == (224, 256)

    image = torch.arange(3 * 20 * 40, dtype=torch.float32).reshape(3, 20, 40).remainder(256).to(torch.uint8)
    prep = Preprocessing(
        height=8,
        width=8,
        resize_shortest_edge=10,
        rescale_factor=1 / 255,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        channels=3,
    )
    cropped = resize_and_crop(image, prep)
    assert cropped.shape == (3, 8, 8) and cropped.dtype == torch.uint8
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalise(white, prep), torch.full((1, 3, 2, 2), 2.0))  # (1 - 0.5) / 0.25


def test_augmentation_flips_and_crops_per_image() -> None:
    pixels = torch.rand(4, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    flipped = augment(pixels, ImageAugmentation(horizontal_flip=True), generator)
    for i in range(4):  # each image is either itself or its mirror image
        same = torch.allclose(flipped[i], pixels[i], atol=1e-5)
        mirrored = torch.allclose(flipped[i], pixels[i].flip(-1), atol=1e-5)
        assert same or mirrored
    cropped = augment(pixels, ImageAugmentation(random_resized_crop=True, crop_scale=[0.3, 0.5]), generator)
    assert cropped.shape == pixels.shape and not torch.allclose(cropped, pixels)


@pytest.mark.parametrize("family", ["resnet", "mobilenet_v2", "vit"])
def test_derived_students_reach_the_target_size(family: str) -> None:
    teacher = AutoModelForImageClassification.from_config(tiny_config(family, size=16)).eval()
    student, notes = derive_student(teacher, 0.3, num_labels=10, channels=3, seed=0, attn_implementation=None)
    ratio = count_parameters(student) / count_parameters(teacher)
    assert 0.15 < ratio < 0.6, (notes, ratio)
    assert notes["initialised_from"] == "teacher" and notes["config_changes"]
    with torch.no_grad():
        assert student(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 10)


def test_copy_from_teacher_takes_leading_slices() -> None:
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 6))
    student = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert copy_from_teacher(student, teacher) == 2
    torch.testing.assert_close(student[0].weight, teacher[0].weight[:2, :3])


def test_attention_transfer_against_a_hand_computed_value() -> None:
    student = torch.zeros(1, 2, 2, 2)
    student[0, :, 0, 0] = 1.0  # all attention on the top-left pixel
    teacher = torch.ones(1, 3, 2, 2)  # uniform attention
    # Q_s = e_0, Q_t = (1/2, 1/2, 1/2, 1/2): || e_0 - Q_t || = sqrt(1/4 + 3/4) = 1
    assert float(attention_transfer_loss(student, teacher)) == pytest.approx(1.0)
    assert torch.allclose(spatial_attention(teacher), torch.full((1, 4), 0.5))
    # Student maps at another resolution are pooled to the teacher's first.
    assert float(attention_transfer_loss(torch.ones(1, 2, 4, 4), teacher)) == pytest.approx(0.0, abs=1e-6)


def test_feature_map_hint_is_a_1x1_regression_with_aligned_sizes() -> None:
    student_maps = [torch.randn(2, 4, 4, 3)]  # (B, h, w, C_s), channel-last
    teacher_maps = [torch.randn(2, 2, 2, 5)]  # (B, H, W, C_t)
    projector = FeatureProjector([3], [5])
    inputs = LossInputs(
        student=ModelOutputs(logits=torch.zeros(2, 2), hidden_states=student_maps),
        teacher=ModelOutputs(logits=torch.zeros(2, 2), hidden_states=teacher_maps),
        targets=torch.zeros(2, dtype=torch.long),
        temperature=1.0,
        projector=projector,
    )
    value = get_loss("feature_map_hint").fn(inputs)
    regressed = projector(student_maps[0], 0).permute(0, 3, 1, 2)  # (B, 5, 4, 4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(regressed, (2, 2))
    expected = (pooled - teacher_maps[0].permute(0, 3, 1, 2)).pow(2).mean()
    assert math.isclose(float(value), float(expected), rel_tol=1e-5)


def test_class_folders_follow_the_teachers_label_order() -> None:
    """A teacher whose id2label lists the classes in another order keeps its order (its logits mean those
    classes); names that do not match the teacher's fall back to sorted folder names."""
    from workers.distill.tasks.vision.adapter import ImageClassificationAdapter

    names = ["cat", "dog", "emu"]
    teacher = AutoModelForImageClassification.from_config(
        tiny_config("resnet", num_labels=3, labels=["emu", "cat", "dog"])
    )
    adapter = ImageClassificationAdapter()
    assert adapter._label_order(teacher, names) == ["emu", "cat", "dog"]
    other = AutoModelForImageClassification.from_config(tiny_config("resnet", num_labels=3))
    assert adapter._label_order(other, names) == names


def test_hub_image_dataset_goes_through_load_dataset(digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kind 'hub': datasets.load_dataset(name, subset, split=, revision=) (the network call replaced by a
    local table of the same shape: an Image column and a ClassLabel)."""
    files = sorted(digits.glob("*/*.png"))
    table = datasets.Dataset.from_dict(
        {"img": [str(p) for p in files], "label": [DIGIT_NAMES.index(p.parent.name) for p in files]},
        features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)}
        ),
    )
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, subset: str | None, *, split: str, revision: str | None) -> datasets.Dataset:
        calls.append((name, subset, split, revision))
        return table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = _spec(
        {"kind": "hub", "name": "org/digits", "split": "train", "revision": "v1"},
        image_config={"image_column": "img"},
    )
    splits = read_image_splits(spec, file_root=None)
    assert calls == [("org/digits", None, "train", "v1")]
    assert splits.label_names == DIGIT_NAMES and len(splits.test.items) == 10
    decoded = decode_split(splits.val, splits.label_names, PREP)
    assert decoded.tensors["pixels"].shape[1:] == (3, 16, 16)
