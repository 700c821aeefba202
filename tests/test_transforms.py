"""DETR augmentation: the size rule against an exact-arithmetic oracle, and box/mask invariants of every transform."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.ops import masks_to_boxes

import datasets.transforms as T
from datasets.coco import make_coco_transforms


def oracle_size(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """DESIGN 4 size rule in exact rational arithmetic: returns (h, w)."""
    short, long = min(w, h), max(w, h)
    if max_size is not None and Fraction(long, short) * size > max_size:
        size = round(Fraction(max_size * short, long))  # Fraction rounds half to even, like round(float)
    if short == size:
        return h, w
    new_long = (size * long) // short
    return (new_long, size) if h > w else (size, new_long)


IMAGE_SIZES = [
    (1, 1), (2, 3), (5, 7), (17, 9), (31, 32),  # tiny
    (640, 480), (480, 640), (800, 800), (801, 799), (1333, 800), (800, 1333), (1334, 800),  # typical
    (1000, 1), (1, 1000), (20000, 300), (300, 20000), (100, 2000), (2000, 100),  # extreme aspect
    (10000, 8000), (8000, 10000), (4096, 4096), (12345, 6789),  # huge
    (333, 517), (517, 333), (999, 601), (601, 999), (127, 255), (255, 127), (1023, 767), (3, 1000),  # odd
    (128, 128), (160, 128), (128, 160), (143, 151),  # synthetic-like
]  # fmt: skip
SIZE_LIMITS = [(800, 1333), (480, 1333), (512, None), (128, 213), (1, 1), (799, 800), (7, None)]


def test_size_rule_matches_exact_oracle_on_many_sizes():
    assert len(IMAGE_SIZES) >= 30
    for (w, h), (size, max_size) in itertools.product(IMAGE_SIZES, SIZE_LIMITS):
        got = T.get_size_with_aspect_ratio((w, h), size, max_size)
        assert got == oracle_size(w, h, size, max_size), (w, h, size, max_size)


def test_size_rule_properties():
    assert T.get_size_with_aspect_ratio((640, 480), 800, 1333) == (800, 1066)  # short 480 -> 800
    assert T.get_size_with_aspect_ratio((600, 800), 600, 1333) == (800, 600)  # already the right size
    assert T.get_size_with_aspect_ratio((3000, 1000), 800, 1333) == (444, 1332)  # round(1333 / 3), int(444 * 3)


def _target(boxes, labels, hw, with_masks=True):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    target = {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        "size": torch.tensor(hw),
        "orig_size": torch.tensor(hw),
    }
    if with_masks:  # rectangle masks that exactly fill the integer boxes
        masks = torch.zeros((len(labels), *hw), dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        target["masks"] = masks
    return target


def _image(hw, seed=0):
    return torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_hflip_twice_is_identity_and_mirrors_boxes():
    image = _image((20, 30))
    target = _target([[2, 3, 10, 12], [0, 0, 30, 20]], [1, 7], (20, 30))
    flipped_image, flipped = T.hflip(image, target)
    assert torch.equal(flipped["boxes"][0], torch.tensor([20.0, 3, 28, 12]))  # x0' = W - x1
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(masks_to_boxes(flipped["masks"]) + torch.tensor([0, 0, 1, 1]), flipped["boxes"])
    again_image, again = T.hflip(flipped_image, flipped)
    assert torch.equal(again_image, image)
    for key in ("boxes", "masks", "labels", "area"):
        assert torch.equal(again[key], target[key])


def test_crop_drops_outside_boxes_clips_the_rest_and_keeps_fields_aligned():
    image = _image((40, 50))
    target = _target([[5, 5, 15, 15], [30, 20, 48, 38], [0, 30, 6, 40], [20, 10, 26, 16]], [1, 3, 4, 7], (40, 50))
    target["iscrowd"] = torch.tensor([0, 0, 0, 1])
    cropped_image, out = T.crop(image, target, (8, 10, 24, 25))  # rows 8..32, cols 10..35
    assert torch.equal(cropped_image, image[:, 8:32, 10:35])
    # box 0 clipped to x 10..15, y 8..15; box 1 clipped to x 30..35, y 20..32; box 2 is outside and dropped.
    expected = torch.tensor([[0.0, 0, 5, 7], [20, 12, 25, 24], [10, 2, 16, 8]])
    assert torch.equal(out["boxes"], expected)
    assert out["labels"].tolist() == [1, 3, 7]
    assert out["iscrowd"].tolist() == [0, 0, 1]
    assert out["size"].tolist() == [24, 25]
    # with masks the area is the mask pixel count; masks still match the boxes exactly
    assert out["area"].tolist() == [35.0, 60.0, 36.0]
    assert torch.equal(masks_to_boxes(out["masks"]) + torch.tensor([0, 0, 1, 1]), out["boxes"])
    _, no_masks = T.crop(image, {k: v for k, v in target.items() if k != "masks"}, (8, 10, 24, 25))
    assert torch.equal(no_masks["area"], (expected[:, 2] - expected[:, 0]) * (expected[:, 3] - expected[:, 1]))


def test_resize_scales_boxes_area_and_masks():
    image = _image((40, 60))
    target = _target([[6, 4, 30, 20], [30, 20, 60, 40]], [1, 9], (40, 60))
    resized, out = T.resize(image, target, 80)  # short side 40 -> 80, so exactly x2
    assert tuple(resized.shape) == (3, 80, 120)
    assert torch.allclose(out["boxes"], target["boxes"] * 2)
    assert torch.allclose(out["area"], target["area"] * 4)
    assert out["size"].tolist() == [80, 120] and out["orig_size"].tolist() == [40, 60]
    assert torch.equal(masks_to_boxes(out["masks"]) + torch.tensor([0, 0, 1, 1]), out["boxes"])
    _, explicit = T.resize(image, target, (30, 20))  # an explicit size is (w, h), as published
    assert explicit["size"].tolist() == [20, 30]
    assert torch.allclose(explicit["boxes"], target["boxes"] / 2)


def test_normalize_matches_independent_computation():
    image = _image((10, 16))
    target = _target([[4, 2, 12, 10]], [3], (10, 16), with_masks=False)
    out_image, out = T.Normalize()(image, target)
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out_image, (image.float() / 255 - mean) / std, atol=1e-5)
    assert torch.allclose(out["boxes"], torch.tensor([[8 / 16, 6 / 10, 8 / 16, 8 / 10]]))
    float_image, _ = T.Normalize()(*T.ToTensor()(image, None))
    assert torch.allclose(float_image, out_image, atol=1e-5)
    pil_image, _ = T.Normalize()(PIL.Image.fromarray(image.permute(1, 2, 0).numpy()), None)
    assert torch.allclose(pil_image, out_image, atol=1e-5)


def test_sanitize_drops_empty_boxes_and_aligned_fields():
    target = _target([[0, 0, 4, 4], [3, 3, 3, 8], [1, 1, 2, 2]], [1, 3, 4], (10, 10))
    out = T.SanitizeBoxes()(None, target)[1]
    assert out["labels"].tolist() == [1, 4]
    assert out["masks"].shape[0] == 2 and out["area"].tolist() == [16.0, 1.0]


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_pipeline_invariants_on_random_inputs(image_set):
    transform = make_coco_transforms(image_set, input_scale=0.15)
    rng = np.random.default_rng(0)
    for trial in range(15):
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        boxes = []
        for _ in range(int(rng.integers(0, 6))):
            x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
            boxes.append([x0, y0, int(rng.integers(x0 + 2, w + 1)), int(rng.integers(y0 + 2, h + 1))])
        target = _target(boxes or np.zeros((0, 4)), [1] * len(boxes), (h, w))
        image, out = transform(_image((h, w), trial), target)
        out_h, out_w = image.shape[-2:]
        assert image.dtype == torch.float32 and out["size"].tolist() == [out_h, out_w]
        assert out["orig_size"].tolist() == [h, w]
        n = out["boxes"].shape[0]
        assert all(out[k].shape[0] == n for k in ("labels", "area", "iscrowd", "masks"))
        assert out["masks"].shape[-2:] == (out_h, out_w)
        if n == 0:
            continue
        cx, cy, bw, bh = out["boxes"].unbind(-1)
        assert (bw > 0).all() and (bh > 0).all()
        assert (cx - bw / 2 >= -1e-6).all() and (cx + bw / 2 <= 1 + 1e-6).all()
        assert (cy - bh / 2 >= -1e-6).all() and (cy + bh / 2 <= 1 + 1e-6).all()
        # boxes and masks stay aligned: the mask extent is the box up to the rounding of two nearest-neighbour
        # resizes (one source pixel each); a missed flip or crop would be off by far more
        nonempty = out["masks"].flatten(1).any(1).bool()
        mask_boxes = masks_to_boxes(out["masks"][nonempty]) + torch.tensor([0, 0, 1, 1])
        scale = torch.tensor([out_w, out_h, out_w, out_h])
        boxes_xyxy = torch.cat(
            [out["boxes"][:, :2] - out["boxes"][:, 2:] / 2, out["boxes"][:, :2] + out["boxes"][:, 2:] / 2], 1
        )
        assert torch.allclose(mask_boxes.float(), boxes_xyxy[nonempty] * scale, atol=3.0)


def test_val_pipeline_size_and_input_scale():
    image = _image((48, 64))
    target = _target([[8, 8, 40, 40]], [1], (48, 64))
    out_image, out = make_coco_transforms("val")(image, target)
    assert tuple(out_image.shape[-2:]) == T.get_size_with_aspect_ratio((64, 48), 800, 1333) == (800, 1066)
    out_image, out = make_coco_transforms("val", input_scale=0.25)(image, target)
    assert tuple(out_image.shape[-2:]) == (200, 266)  # 800 * 0.25 = 200, 1333 * 0.25 -> 333
    assert torch.allclose(out["boxes"], torch.tensor([[24 / 64, 0.5, 0.5, 32 / 48]]), atol=0.01)
    pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
    pil_out_image, pil_out = make_coco_transforms("val", input_scale=0.25)(pil, target)
    assert pil_out_image.shape == out_image.shape and torch.allclose(pil_out["boxes"], out["boxes"])
    with pytest.raises(ValueError, match="image_set"):
        make_coco_transforms("test")


def test_random_choices_cover_both_branches():
    torch.manual_seed(0)
    select = T.RandomSelect(lambda i, t: ("first", t), lambda i, t: ("second", t))
    picks = {select(None, None)[0] for _ in range(50)}
    assert picks == {"first", "second"}
    resize = T.RandomResize([10, 20, 30])
    sizes = {min(resize(_image((40, 50)), None)[0].shape[-2:]) for _ in range(60)}
    assert sizes == {10, 20, 30}
    flips = [T.RandomHorizontalFlip(0.5)(torch.arange(4).view(1, 1, 4), None)[0][0, 0, 0].item() for _ in range(60)]
    assert set(flips) == {0, 3}
