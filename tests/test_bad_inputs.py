"""Bad input: each case gives a clear DatasetError naming the file, or with --skip_bad_images a counted skip."""

from __future__ import annotations

import io
import json
import logging
from functools import partial

import numpy as np
import PIL.Image
import pytest
import torch
from test_coco_dataset import ann, write_coco

from datasets import skipped_samples
from datasets.coco import CocoDetection
from datasets.coco_io import read_image_rgb
from datasets.errors import DatasetError
from util.misc import collate_fn

RGB = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)


def _dataset(tmp_path, images=None, annotations=None, **kwargs):
    ann_file = write_coco(tmp_path, images=images, annotations=annotations)
    return CocoDetection(tmp_path / "val2017", ann_file, transforms=None, return_masks=False, **kwargs)


def _three_images(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2, 3)]
    return images, [ann(i, [1, 1, 5, 5], image_id=i) for i in (1, 2, 3)]


def test_missing_image_file_raises_or_is_skipped_and_counted(tmp_path, caplog):
    images, annotations = _three_images(tmp_path)
    dataset = _dataset(tmp_path, images, annotations)
    (tmp_path / "val2017" / "2.png").unlink()
    with pytest.raises(DatasetError, match=r"2\.png: image file not found"):
        dataset[1]

    skipping = _dataset(tmp_path, images, annotations, skip_bad_images=True)
    (tmp_path / "val2017" / "2.png").unlink()
    with caplog.at_level(logging.WARNING):
        assert skipping[1] is None  # evaluation: the sample is dropped by collate_fn
    assert skipping.skipped == 1
    assert len(caplog.records) == 1 and "2.png" in caplog.text and "\n" not in caplog.records[0].getMessage()
    substituting = _dataset(tmp_path, images, annotations, skip_bad_images=True, substitute_bad=True)
    (tmp_path / "val2017" / "2.png").unlink()
    assert substituting[1][1]["image_id"].item() == 3  # training: the next readable sample instead
    assert substituting.skipped == 1


@pytest.mark.parametrize(
    "content",
    [b"not an image at all", b"", "truncated_jpeg", "truncated_png"],
    ids=["garbage", "empty", "truncated_jpeg", "truncated_png"],
)
def test_corrupt_or_truncated_image(tmp_path, content):
    if isinstance(content, str):
        buffer = io.BytesIO()
        PIL.Image.fromarray(RGB).save(buffer, "JPEG" if "jpeg" in content else "PNG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path = tmp_path / "bad.img"
    path.write_bytes(content)
    for decoder in ("torchvision", "pil"):
        with pytest.raises(DatasetError, match=r"bad\.img: (cannot decode image, corrupt or truncated|.*empty)"):
            read_image_rgb(path, decoder)


def test_annotation_json_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON .* line 1 column 13"):
        CocoDetection(tmp_path, bad, None, False)
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "missing.json", None, False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("images"), "missing or non-list key 'images'"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] lacks required key\(s\) \['file_name'\]"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] lacks required key\(s\) \['bbox'\]"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be 4 numbers"),
        (lambda d: d["annotations"][0].update(category_id=99), "category_id 99, which is not in 'categories'"),
        (lambda d: d["images"][0].update(width=0), "invalid width/height"),
        (lambda d: d["images"][0].update(id="7"), r"images\[0\] id must be an integer"),
        (lambda d: d.__setitem__("categories", "x"), "non-list key 'categories'"),
    ],
)
def test_annotation_json_lacking_required_keys(tmp_path, edit, message):
    ann_file = write_coco(tmp_path, annotations=[ann(1, [1, 1, 5, 5])])
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as err:
        CocoDetection(tmp_path / "val2017", ann_file, None, False)
    assert str(ann_file) in str(err.value)


@pytest.mark.parametrize("bbox", [[float("nan"), 1, 5, 5], [1, 1, float("inf"), 2]])
def test_boxes_with_nan_or_inf(tmp_path, bbox, caplog):
    images, annotations = _three_images(tmp_path)
    annotations.append(ann(9, bbox, image_id=2))
    with pytest.raises(DatasetError, match=r"annotation id 9 \(image id 2\) has bbox .* NaN/inf"):
        _dataset(tmp_path, images, annotations)
    with caplog.at_level(logging.WARNING):
        dataset = _dataset(tmp_path, images, annotations, skip_bad_images=True)
    assert dataset.ids == [1, 3] and dataset.excluded_ids == [2]
    assert "skipping 1 image(s) with invalid boxes" in caplog.text


def test_boxes_with_negative_size_are_dropped_with_one_warning_per_file(tmp_path, caplog):
    """Published behaviour: such boxes leave the targets (as zero-size ones do) and training goes on."""
    images, annotations = _three_images(tmp_path)
    annotations += [ann(9, [1, 1, -3, 5], image_id=2), ann(10, [1, 1, 5, -0.5], image_id=2)]
    with caplog.at_level(logging.WARNING):
        dataset = _dataset(tmp_path, images, annotations)
    warnings = [r.getMessage() for r in caplog.records if "negative width/height" in r.getMessage()]
    assert len(warnings) == 1 and "2 annotation(s)" in warnings[0] and "first: id 9" in warnings[0]
    assert dataset.ids == [1, 2, 3]
    _, target = dataset[1]  # image 2: its valid box kept, the two negative ones dropped
    assert target["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0]]


def test_json_image_size_disagreeing_with_file(tmp_path):
    images = [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}]
    ann_file = write_coco(tmp_path, images=images)
    data = json.loads(ann_file.read_text())
    data["images"][0]["width"] = 41
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"a\.png: image is 40x30 but instances_val2017\.json says 41x30"):
        CocoDetection(tmp_path / "val2017", ann_file, None, False)[0]
    skipping = CocoDetection(tmp_path / "val2017", ann_file, None, False, skip_bad_images=True)
    assert skipping[0] is None and skipping.skipped == 1


def _encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_image_modes_are_converted_to_rgb(tmp_path, decoder):
    gray = RGB[..., 0]
    cases = {
        "gray.png": (_encoded(PIL.Image.fromarray(gray), "PNG"), np.repeat(gray[..., None], 3, -1), 0),
        "rgba.png": (_encoded(PIL.Image.fromarray(np.dstack([RGB, gray])), "PNG"), RGB, 0),
        "palette.png": (_encoded(PIL.Image.fromarray(RGB).quantize(256), "PNG"), None, 0),
        "16bit.png": (_encoded(PIL.Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), np.dstack([gray] * 3), 1),
        "cmyk.jpg": (_encoded(PIL.Image.fromarray(RGB).convert("CMYK"), "JPEG"), RGB, 40),
        "gray.jpg": (_encoded(PIL.Image.fromarray(gray), "JPEG"), np.dstack([gray] * 3), 40),
        "rgb.bmp": (_encoded(PIL.Image.fromarray(RGB), "BMP"), RGB, 0),  # torchvision cannot: PIL fallback
    }
    for name, (content, expected, tolerance) in cases.items():
        (tmp_path / name).write_bytes(content)
        image = read_image_rgb(tmp_path / name, decoder)
        pixels = np.asarray(image) if decoder == "pil" else image.permute(1, 2, 0).numpy()
        assert pixels.shape == (12, 16, 3) and pixels.dtype == np.uint8, name
        if expected is not None:
            error = np.abs(pixels.astype(int) - expected.astype(int))
            assert error.mean() <= max(tolerance / 4, 0.01) and error.max() <= max(tolerance * 2, tolerance), name


def _collate_loader(dataset, workers):
    return torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=partial(collate_fn))


def test_worker_errors_reach_the_main_process_clearly_and_skips_are_counted(tmp_path):
    images, annotations = _three_images(tmp_path)
    dataset = _dataset(tmp_path, images, annotations)
    (tmp_path / "val2017" / "1.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"1\.png: cannot decode image, corrupt or truncated"):
        list(_collate_loader(dataset, 1))

    skipping = _dataset(tmp_path, images, annotations, skip_bad_images=True)
    (tmp_path / "val2017" / "1.png").write_bytes(b"junk")
    (tmp_path / "val2017" / "3.png").unlink()
    batches = list(_collate_loader(skipping, 2))
    assert [len(targets) for _, targets in batches] == [1, 0]  # [bad, good] and [missing]
    assert batches[1][0] is None and batches[0][1][0]["image_id"].item() == 2
    assert skipping.skipped == 2  # counted inside the worker processes, visible here
    assert skipped_samples(torch.utils.data.Subset(skipping, [0])) == 2 and skipped_samples([1]) == 0
