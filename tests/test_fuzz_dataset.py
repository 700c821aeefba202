"""Fuzzing the COCO dataset: corrupted annotation files and image bytes end in a valid sample or DatasetError.

Never another exception type: a user with a broken file gets the project's one-line error naming it.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from datasets.coco import CocoDetection, make_coco_transforms
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
        target = draw(st.sampled_from(containers))
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
