"""Fuzzing the COCO dataset: corrupted annotation files and image bytes end in a valid sample or DatasetError.

Never another exception type: a user with a broken file gets the project's one-line error naming it.
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.coco import CocoDetection, make_coco_transforms
from datasets.coco_io import _rle_string_counts
from datasets.errors import DatasetError

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
H, W = 24, 32

BASE = {
    "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [2.0, 3.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "area": 25.0, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [0, 5, H - 5, 5, H * W - 5 - (H - 5) - 5]}},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}  # fmt: skip

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e308, -0.0, 2**63, float("nan")]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _png(height: int = H, width: int = W) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def mutated_documents(draw) -> dict:
    """The base document with 1-3 random fields deleted or replaced by random JSON values."""
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        containers: list = [doc, *doc["images"], *doc["annotations"], *doc["categories"]]
        containers += [a["bbox"] for a in doc["annotations"] if isinstance(a, dict) and isinstance(a.get("bbox"), list)]
        # An earlier step may have replaced an entry by a scalar: only dicts and lists can be mutated further.
        target = draw(st.sampled_from([c for c in containers if isinstance(c, (dict, list))]))
        if isinstance(target, dict):
            keys = sorted(target) + ["extra"]
            key = draw(st.sampled_from(keys))
            if draw(st.booleans()) and key in target:
                del target[key]
            else:
                target[key] = draw(json_values)
        elif target:
            target[draw(st.integers(0, len(target) - 1))] = draw(json_values)
        doc["images"] = doc["images"] if isinstance(doc.get("images"), list) else []
        doc["annotations"] = doc["annotations"] if isinstance(doc.get("annotations"), list) else []
        doc["categories"] = doc["categories"] if isinstance(doc.get("categories"), list) else []
    return doc


def _check_dataset(folder: Path, ann_text: str | bytes, image: bytes, masks: bool) -> None:
    """Build the dataset and read every sample: each step ends in a valid result or DatasetError."""
    (folder / "a.png").write_bytes(image)
    ann = folder / "ann.json"
    ann.write_bytes(ann_text if isinstance(ann_text, bytes) else ann_text.encode())
    try:
        dataset = CocoDetection(folder, ann, make_coco_transforms("train", 0.05), return_masks=masks)
    except DatasetError as e:
        assert "\n" not in str(e)
        return
    for index in range(len(dataset)):
        try:
            image_out, target = dataset[index]
        except DatasetError as e:
            assert "\n" not in str(e)
            continue
        assert image_out.ndim == 3 and image_out.shape[0] == 3 and torch.isfinite(image_out).all()
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 1).all()
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(boxes)
        if masks:
            assert target["masks"].shape[0] == len(boxes)


def test_base_document_gives_a_valid_sample(tmp_path):
    dataset = CocoDetection(tmp_path, _write(tmp_path, BASE), make_coco_transforms("val", 0.05), return_masks=True)
    (tmp_path / "a.png").write_bytes(_png())
    _, target = dataset[0]
    assert target["labels"].tolist() == [2] and target["masks"].shape[0] == 1  # the crowd box is dropped


def _write(folder: Path, doc: dict) -> Path:
    path = folder / "ann.json"
    path.write_text(json.dumps(doc))
    return path


@FUZZ
@given(doc=mutated_documents(), masks=st.booleans())
def test_mutated_annotation_files(tmp_path_factory, doc, masks):
    _check_dataset(tmp_path_factory.mktemp("fuzz"), json.dumps(doc), _png(), masks)


@FUZZ
@given(
    content=st.one_of(
        json_values.map(json.dumps),
        st.binary(max_size=64),
        st.sampled_from(["", "{", "[]", "null", '{"images": 3}', json.dumps(BASE)[:-7]]),
    )
)
def test_random_annotation_files(tmp_path_factory, content):
    _check_dataset(tmp_path_factory.mktemp("fuzz"), content, _png(), False)


@st.composite
def corrupted_images(draw) -> bytes:
    fmt = draw(st.sampled_from(["PNG", "JPEG", "random"]))
    if fmt == "random":
        return draw(st.binary(max_size=256))
    buffer = io.BytesIO()
    size = draw(st.sampled_from([(W, H), (W + 1, H), (1, 1)]))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"])) if fmt == "PNG" else "RGB"
    Image.new(mode, size).save(buffer, format=fmt)
    data = bytearray(buffer.getvalue())
    action = draw(st.sampled_from(["truncate", "flip", "intact"]))
    if action == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif action == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(image=corrupted_images(), masks=st.booleans())
def test_corrupted_image_bytes(tmp_path_factory, image, masks):
    _check_dataset(tmp_path_factory.mktemp("fuzz"), json.dumps(BASE), image, masks)


# Documents hypothesis found (each raised a TypeError before load_coco_json checked the field), plus neighbours
# of them; kept explicit so CI does not depend on the search finding them again.
def _edit(path: str, value) -> dict:
    doc = copy.deepcopy(BASE)
    section, index, key = path.split(".")
    doc[section][int(index)][key] = value
    return doc


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("annotations.0.id", [], r"annotations\[0\] id must be an int or string, got list"),
        ("annotations.0.area", None, r"annotations\[0\] area must be a finite non-negative number, got null"),
        ("images.0.file_name", None, r"images\[0\] file_name must be a non-empty file name, got null"),
        ("annotations.1.category_id", [1], r"annotations\[1\] category_id must be an integer \(64-bit\), got list"),
        ("annotations.0.image_id", True, r"annotations\[0\] image_id must be an integer \(64-bit\), got true"),
        ("images.0.id", 2**70, r"images\[0\] id must be an integer \(64-bit\), got 1180591620717411303424"),
        ("annotations.0.iscrowd", "0", r"annotations\[0\] iscrowd must be 0 or 1, got '0'"),
        ("annotations.0.bbox", [1, 2, 3, 2**1100], r"annotations\[0\] bbox must be 4 numbers \[x, y, w, h\]"),
        ("annotations.0.segmentation", 5, r"annotations\[0\] segmentation must be a list of polygons"),
        ("annotations.1.segmentation", {"counts": 3, "size": [H, W]}, r"annotations\[1\] segmentation must be"),
        ("categories.1.name", 2, r"categories\[1\] name must be a string, got 2"),
    ],
)
def test_bad_field_is_a_dataset_error_at_load(tmp_path, path, value, message):
    ann = _write(tmp_path, _edit(path, value))
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(tmp_path, ann, None, return_masks=True)
    assert str(err.value).startswith(f"{ann}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([[0, 0, 2**70, 0, 5, 5]], "polygon 0 has a point farther outside the 32x24 image than its own size"),
        ([[0, 0, 9, 0, float("nan"), 5]], "polygon 0 must hold finite numbers"),
        ({"size": [H, W], "counts": [3, 4]}, f"RLE counts add up to 7, not height x width = {H * W}"),
        ({"size": [H + 1, W], "counts": [H * W + W]}, f"RLE size [{H + 1}, {W}] is not the image's"),
        ({"size": [H, W], "counts": "0:0"}, f"RLE counts add up to 10, not height x width = {H * W}"),
        ({"size": [H, W], "counts": "~~"}, "not a valid compressed RLE string"),
    ],
)
def test_bad_segmentation_content_is_a_dataset_error_per_sample(tmp_path, segmentation, message):
    """Content pycocotools would rasterise wrongly (garbage, unbounded memory) fails the sample, naming both files."""
    (tmp_path / "a.png").write_bytes(_png())
    ann = _write(tmp_path, _edit("annotations.0.segmentation", segmentation))
    dataset = CocoDetection(tmp_path, ann, None, return_masks=True)
    with pytest.raises(DatasetError, match=re.escape(message)) as err:
        dataset[0]
    assert str(err.value).startswith(f"{ann}: annotation id 1: ") and "a.png" in str(err.value)
    CocoDetection(tmp_path, ann, None, return_masks=False)[0]  # without masks the segmentation is not read


def _runs(mask: np.ndarray) -> list[int]:
    """Run lengths of the column-major flattening, starting with a (possibly empty) run of zeros."""
    runs, current, length = [], 0, 0
    for value in mask.ravel(order="F"):
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    return runs + [length]


def test_compressed_rle_counts_match_the_run_lengths():
    rng = np.random.default_rng(0)
    for trial in range(50):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < (0.02 if trial % 2 else 0.6)
        text = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert _rle_string_counts(text) == _runs(mask)


def test_valid_rle_string_string_ids_and_null_segmentation_load(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    mask = np.zeros((H, W), np.uint8)
    mask[3:11, 2:12] = 1
    doc = _edit(
        "annotations.0.segmentation",
        {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(mask))["counts"].decode()},
    )
    doc["annotations"][0]["id"] = "first"
    _, target = CocoDetection(tmp_path, _write(tmp_path, doc), None, return_masks=True)[0]
    assert torch.equal(target["masks"][0], torch.from_numpy(mask))
    doc["annotations"][0]["segmentation"] = None  # detection-only files: fine without masks, a clear error with
    ann = _write(tmp_path, doc)
    assert CocoDetection(tmp_path, ann, None, return_masks=False)[0][1]["labels"].tolist() == [2]
    with pytest.raises(DatasetError, match="annotation id first has no 'segmentation'"):
        CocoDetection(tmp_path, ann, None, return_masks=True)[0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["images"][0].update(file_name=None), r"images\[0\] file_name must be a non-empty file name"),
        (lambda d: d["annotations"][0]["segments_info"][0].update(id=[]), r"segments_info\[0\] id must be an integer"),
        (lambda d: d["annotations"][0]["segments_info"][1].update(area=None), r"segments_info\[1\] area must be"),
        (lambda d: d["annotations"][0]["segments_info"][0].update(bbox=[0, 0, 1, float("inf")]), "bbox must be finite"),
        (lambda d: d["categories"][0].update(isthing="yes"), r"categories\[0\] isthing must be 0 or 1"),
    ],
)
def test_panoptic_file_uses_the_same_checks(tmp_path, edit, message):
    from datasets.coco_panoptic import CocoPanoptic

    for folder in ("img", "png"):
        (tmp_path / folder).mkdir()
    segments = [{"id": 5, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4}, {"id": 9, "category_id": 2}]
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments}],
        "categories": [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}],
    }
    edit(doc)
    ann = _write(tmp_path, doc)
    with pytest.raises(DatasetError, match=message) as err:
        CocoPanoptic(tmp_path / "img", tmp_path / "png", ann)
    assert str(err.value).startswith(f"{ann}: annotations" if "segments" in message else f"{ann}: ")
