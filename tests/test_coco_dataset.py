"""COCO annotations -> DETR targets on hand-written files, dataset building, paths and num_classes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import parse_tiny_args
from pycocotools import mask as mask_utils

import datasets
from datasets.coco import CocoDetection, ConvertCocoPolysToMask, convert_coco_poly_to_mask
from datasets.errors import DatasetError

CATEGORIES = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 11, "name": "c"}]


def write_coco(root: Path, split: str = "val", images=None, annotations=None, categories=None) -> Path:
    """Write a COCO-layout split: images given as {'id', 'file_name', 'width', 'height'} get random pixels."""
    images = images or [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}]
    rng = np.random.default_rng(0)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    for image in images:
        pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(root / f"{split}2017" / image["file_name"])
    data = {"images": images, "annotations": annotations or [], "categories": categories or CATEGORIES}
    (root / "annotations").mkdir(exist_ok=True)
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps(data))
    return ann_file


def ann(ann_id, bbox, category_id=2, image_id=7, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_convert_annotations_to_target():
    image = PIL.Image.new("RGB", (40, 30))
    annotations = [
        ann(1, [2, 3, 10, 5], area=41.0, segmentation=[[2, 3, 12, 3, 12, 8, 2, 8]]),
        ann(2, [30, 20, 20, 20], category_id=11, area=9.0, segmentation=[[30, 20, 40, 20, 40, 30, 30, 30]]),
        ann(3, [5, 5, 4, 4], category_id=5, iscrowd=1, segmentation={"counts": [0, 1200], "size": [30, 40]}),
        ann(4, [8, 8, 0, 6], segmentation=[[8, 8, 9, 8, 9, 14]]),  # zero width: removed
        ann(5, [-4, -2, 10, 6], category_id=5, area=12.0, segmentation=[[0, 0, 6, 0, 6, 4, 0, 4]]),
    ]
    _, target = ConvertCocoPolysToMask(return_masks=True)(image, {"image_id": 7, "annotations": annotations})
    # crowd (3) and empty (4) dropped; (x, y, w, h) -> (x0, y0, x1, y1) clamped to the 40 x 30 image
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30], [0, 0, 6, 4]]
    assert target["labels"].tolist() == [2, 11, 5]
    assert target["area"].tolist() == [41.0, 9.0, 12.0]
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["image_id"].tolist() == [7]
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, 30, 40)
    assert target["masks"].flatten(1).sum(1).tolist() == [10 * 5, 10 * 10, 6 * 4]  # integer rectangles
    assert target["masks"][0, 3:8, 2:12].all() and target["masks"][0].sum() == 50
    _, no_masks = ConvertCocoPolysToMask()(image, {"image_id": 7, "annotations": annotations})
    assert "masks" not in no_masks and torch.equal(no_masks["boxes"], target["boxes"])
    _, empty = ConvertCocoPolysToMask(True)(image, {"image_id": 3, "annotations": []})
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 40)


def test_dataset_returns_decoded_image_and_target(tmp_path):
    ann_file = write_coco(tmp_path, annotations=[ann(1, [1, 2, 3, 4]), ann(2, [0, 0, 5, 5], 5, iscrowd=1)])
    dataset = CocoDetection(tmp_path / "val2017", ann_file, transforms=None, return_masks=False)
    assert len(dataset) == 1 and dataset.ids == [7]
    image, target = dataset[0]
    expected = np.array(PIL.Image.open(tmp_path / "val2017" / "a.png"))
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert target["boxes"].tolist() == [[1, 2, 4, 6]] and target["labels"].tolist() == [2]
    assert target["area"].tolist() == [12.0]  # filled in from the bbox when the file has no 'area'
    pil = CocoDetection(tmp_path / "val2017", ann_file, None, False, decoder="pil")[0][0]
    assert isinstance(pil, PIL.Image.Image) and np.array_equal(np.asarray(pil), expected)


def test_build_dataset_from_coco_path_and_explicit_flags(tmp_path):
    write_coco(tmp_path, "train", annotations=[ann(1, [1, 2, 3, 4], 11)])
    write_coco(tmp_path, "val", annotations=[ann(1, [1, 2, 3, 4], 5)])
    args = parse_tiny_args("--coco_path", str(tmp_path), "--remove_difficult")
    assert datasets.num_classes_for(args) == 12  # largest category id 11 + 1
    train = datasets.build_dataset("train", args)
    image, target = train[0]
    assert image.dtype == torch.float32 and image.ndim == 3
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    val = datasets.build_dataset("val", args)
    subset = torch.utils.data.Subset(torch.utils.data.Subset(val, [0]), [0])
    assert datasets.get_coco_api_from_dataset(subset) is val.coco
    assert datasets.get_coco_api_from_dataset([1, 2]) is None

    other = tmp_path / "custom"
    other.mkdir()
    (tmp_path / "val2017").rename(other / "pictures")
    (tmp_path / "annotations" / "instances_val2017.json").rename(other / "labels.json")
    args = parse_tiny_args("--val_img_folder", str(other / "pictures"), "--val_ann_file", str(other / "labels.json"))
    assert len(datasets.build_dataset("val", args)) == 1
    with pytest.raises(DatasetError, match="--train_img_folder"):
        datasets.build_dataset("train", parse_tiny_args("--train_ann_file", str(other / "labels.json")))
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.build_dataset("val", parse_tiny_args("--coco_path", str(tmp_path / "nowhere")))


def test_category_id_beyond_num_classes_is_a_startup_error(tmp_path):
    ann_file = write_coco(tmp_path, "val", annotations=[ann(1, [1, 2, 3, 4], 11)])
    with pytest.raises(DatasetError, match=r"category id 11 >= num_classes 5") as err:
        datasets.build_dataset("val", parse_tiny_args("--coco_path", str(tmp_path), "--num_classes", "5"))
    assert str(ann_file) in str(err.value)
    args = parse_tiny_args("--coco_path", str(tmp_path), "--num_classes", "12")
    assert datasets.num_classes_for(args) == 12 and len(datasets.build_dataset("val", args)) == 1


def test_unknown_dataset_file_and_panoptic_delegation(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="not supported"):
        datasets.build_dataset("train", parse_tiny_args("--dataset_file", "voc"))
    calls = []
    fake = types.ModuleType("datasets.coco_panoptic")
    fake.build = lambda image_set, args: calls.append(image_set) or "panoptic dataset"
    monkeypatch.setitem(sys.modules, "datasets.coco_panoptic", fake)
    monkeypatch.setattr(datasets, "coco_panoptic", fake, raising=False)
    args = parse_tiny_args("--dataset_file", "coco_panoptic")
    assert datasets.build_dataset("val", args) == "panoptic dataset" and calls == ["val"]
    assert datasets.num_classes_for(args) == 250


def test_synthetic_dataset_is_the_default_without_coco_path(tmp_path):
    flags = ["--synthetic_dir", str(tmp_path), "--synthetic_train_size", "3", "--synthetic_val_size", "2"]
    flags += ["--input_scale", "0.1", "--masks"]
    for dataset_file in ("coco", "synthetic"):
        args = parse_tiny_args("--dataset_file", dataset_file, *flags)
        assert datasets.num_classes_for(args) == 13  # synthetic category ids go up to 12
        val = datasets.build_dataset("val", args)
        assert len(val) == 2 and len(datasets.build_dataset("train", args)) == 3
        image, target = val[0]
        assert target["masks"].shape[-2:] == image.shape[-2:] == tuple(target["size"].tolist())
    assert len(list(tmp_path.iterdir())) == 2  # one dataset folder plus its lock file, generated once


def test_segmentation_formats_to_masks():
    expected = np.zeros((10, 12), dtype=np.uint8)
    expected[2:5, 3:9] = 1
    column_major = expected.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], column_major, [1 - column_major[-1]]])))
    uncompressed = {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": [10, 12]}
    compressed = mask_utils.encode(np.asfortranarray(expected))
    compressed["counts"] = compressed["counts"].decode()  # as stored in JSON
    two_parts = [[3, 2, 9, 2, 9, 5, 3, 5], [0, 8, 2, 8, 2, 10, 0, 10]]
    masks = convert_coco_poly_to_mask([uncompressed, compressed, two_parts, [], [[1, 2, 3, 4]]], 10, 12)
    assert masks.shape == (5, 10, 12) and masks.dtype == torch.uint8
    assert torch.equal(masks[0], torch.from_numpy(expected)) and torch.equal(masks[1], masks[0])
    assert torch.equal(masks[2][:8], masks[0][:8]) and masks[2][8:, :2].all()  # union of both polygons
    assert masks[3].sum() == 0 and masks[4].sum() == 0  # empty and degenerate polygons give empty masks
