"""RT-DETRv2 data pipeline: box handling against hand / pixel-derived boxes, the stop epochs, category remap."""

from __future__ import annotations

import random

import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from datasets.errors import DatasetError
from datasets.rtdetr_transforms import (
    COCO_CATEGORY_IDS,
    PUBLISHED_MULTISCALE_SIZES,
    CategoryMap,
    MultiScaleCollate,
    RTDETREvalTransform,
    RTDETRTrainTransform,
    build_rtdetr_transforms,
)
from util.misc import NestedTensor

H, W, S = 48, 64, 64  # input height/width, output square size


def _target(boxes: list[list[float]], labels: list[int] | None = None) -> dict:
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels_t = torch.tensor(labels if labels is not None else list(range(len(boxes_t))), dtype=torch.int64)
    return {
        "boxes": boxes_t,
        "labels": labels_t,
        "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
        "iscrowd": labels_t.clone(),  # a tag: must stay aligned with 'labels' through every drop
        "image_id": torch.tensor([7]),
        "orig_size": torch.tensor([H, W]),
        "size": torch.tensor([H, W]),
    }


def _pixels(target: dict, size: tuple[int, int]) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> absolute (x0, y0, x1, y1) in an image of ``size`` = (h, w)."""
    h, w = size
    cx, cy, bw, bh = target["boxes"].unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=0, atol=1e-6))  # /255 vs *(1/255): last-bit differences


def test_flip_and_resize_match_hand_values():
    """After the stop epoch only flip and resize move boxes: x -> W - x when flipped, then x * S/W, y * S/H."""
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    planted = [[5.0, 6.0, 30.0, 40.0], [40.0, 10.0, 61.0, 20.0]]
    transform = RTDETRTrainTransform((S, S), aug_stop_epoch=0)
    plain, mirrored = F.resize(image, [S, S]).float() / 255, F.resize(F.horizontal_flip(image), [S, S]).float() / 255
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out, target = transform(image, _target(planted))
        flipped = _same(out, mirrored)
        assert flipped or _same(out, plain)
        flips.add(flipped)
        expected = []
        for x0, y0, x1, y1 in planted:
            if flipped:
                x0, x1 = W - x1, W - x0
            expected.append([x0 * S / W, y0 * S / H, x1 * S / W, y1 * S / H])
        torch.testing.assert_close(_pixels(target, (S, S)), torch.tensor(expected))
        assert target["size"].tolist() == [S, S] and target["labels"].tolist() == [0, 1]
        torch.testing.assert_close(target["area"], torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in expected]))
    assert flips == {True, False}


def test_boxes_follow_the_pixels_through_zoom_crop_flip_resize():
    """A white rectangle on black: the output box is the bounding box of the bright pixels (+-1.5 px)."""
    x0, y0, x1, y1 = 18, 10, 46, 34
    image = torch.zeros((3, H, W), dtype=torch.uint8)
    image[:, y0:y1, x0:x1] = 255
    transform = RTDETRTrainTransform((S, S), aug_stop_epoch=10)
    checked = zoomed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, target = transform(image, _target([[x0, y0, x1, y1]]))
        assert out.shape == (3, S, S) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
        if len(target["boxes"]) == 0:  # the crop dropped it (centre outside) or it fell under 1 px
            continue
        gray = out.mean(0)
        bright = gray > (gray.max() + gray.min()) / 2
        rows, cols = bright.any(1).nonzero().flatten(), bright.any(0).nonzero().flatten()
        seen = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
        box = _pixels(target, (S, S))[0]
        torch.testing.assert_close(box, seen, atol=1.5, rtol=0)
        assert ((target["boxes"][:, :2] - target["boxes"][:, 2:] / 2) >= -1e-6).all()
        assert ((target["boxes"][:, :2] + target["boxes"][:, 2:] / 2) <= 1 + 1e-6).all()
        checked += 1
        zoomed += bool(box[2] - box[0] < (x1 - x0) * S / W * 0.8)  # smaller than a plain resize: zoomed out
    assert checked >= 20 and zoomed >= 3


def test_crops_never_leave_boxes_under_one_pixel_and_fields_stay_aligned():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=generator) * torch.tensor([W - 8, H - 8])
    wh = 0.5 + torch.rand(30, 2, generator=generator) * 6  # many boxes around 1 px
    boxes = torch.cat([xy, xy + wh], 1).tolist()
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    transform = RTDETRTrainTransform((S, S), aug_stop_epoch=5)
    dropped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        _, target = transform(image, _target(boxes))
        pixels = _pixels(target, (S, S))
        assert ((pixels[:, 2:] - pixels[:, :2]) >= 1 - 1e-4).all()
        assert torch.equal(target["iscrowd"], target["labels"])
        assert len(target["area"]) == len(target["boxes"]) == len(target["labels"])
        dropped += len(target["labels"]) < len(boxes)
    assert dropped > 0


def test_aug_stop_epoch_skips_the_first_three_ops(monkeypatch):
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    transform = build_rtdetr_transforms("train", size=(S, S), aug_stop_epoch=3)
    calls = []
    for op in transform.augment:
        monkeypatch.setattr(op, "forward", lambda *a, _op=op, _f=op.forward: calls.append(_op) or _f(*a))
    plain, mirrored = F.resize(image, [S, S]).float() / 255, F.resize(F.horizontal_flip(image), [S, S]).float() / 255
    changed = 0
    for epoch in range(5):
        transform.set_epoch(epoch)
        calls.clear()
        for seed in range(10):
            torch.manual_seed(seed)
            out, _ = transform(image, _target([[5, 6, 30, 40]]))
            unchanged = _same(out, plain) or _same(out, mirrored)
            if epoch >= 3:
                assert unchanged, (epoch, seed)
            changed += not unchanged
        assert transform.augmenting == (epoch < 3)
        assert len(calls) == (30 if epoch < 3 else 0)
    assert changed > 0
    assert RTDETRTrainTransform(aug_stop_epoch=None).augmenting


def test_eval_transform_and_pil_input():
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    out, target = RTDETREvalTransform((32, 32))(image, _target([[8, 12, 40, 36]]))
    assert _same(out, F.resize(image, [32, 32]).float() / 255)
    torch.testing.assert_close(target["boxes"], torch.tensor([[24 / W, 24 / H, 32 / W, 24 / H]]))
    assert target["size"].tolist() == [32, 32] and target["orig_size"].tolist() == [H, W]
    pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
    out_pil, target_pil = RTDETREvalTransform((32, 32))(pil, _target([[8, 12, 40, 36]]))
    assert out_pil.shape == (3, 32, 32) and out_pil.dtype == torch.float32
    torch.testing.assert_close(target_pil["boxes"], target["boxes"])
    assert RTDETREvalTransform((32, 32))(image, None)[1] is None
    torch.manual_seed(0)
    out_train, target_train = RTDETRTrainTransform((S, S))(pil, _target([[8, 12, 40, 36]]))
    assert out_train.shape == (3, S, S) and target_train["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="image_set"):
        build_rtdetr_transforms("test")


def _batch(n: int = 2, size: int = S):
    return [(torch.rand(3, size, size), {"labels": torch.tensor([i]), "size": torch.tensor([size, size])})
            for i in range(n)]  # fmt: skip


def test_multiscale_collate_sizes_until_stop_epoch():
    sizes = (32, 48, 96)
    collate = MultiScaleCollate(sizes, stop_epoch=2)
    random.seed(5)
    drawn = [random.choice(sizes) for _ in range(6)]
    random.seed(5)
    for epoch in range(4):
        collate.set_epoch(epoch)
        for draw in range(3):
            batch = _batch()
            samples, targets = collate(batch)
            assert isinstance(samples, NestedTensor) and not samples.mask.any()
            side = drawn[epoch * 3 + draw] if epoch < 2 else S
            assert samples.tensors.shape == (2, 3, side, side)
            assert samples.mask.shape == (2, side, side)
            assert [t["size"].tolist() for t in targets] == [[side, side]] * 2
            # nearest: output pixel (i, j) is input pixel (floor(i * S / side), floor(j * S / side))
            index = (torch.arange(side) * S / side).floor().long()
            expected = torch.stack([image for image, _ in batch])[:, :, index][:, :, :, index]
            assert torch.equal(samples.tensors, expected)
    assert collate.active is False
    assert MultiScaleCollate(None, stop_epoch=None).active is False
    assert MultiScaleCollate(PUBLISHED_MULTISCALE_SIZES, stop_epoch=None).active


def test_multiscale_collate_edges():
    collate = MultiScaleCollate((), stop_epoch=None, nested=False)
    images, targets = collate([None, *_batch(2), None])
    assert isinstance(images, torch.Tensor) and images.shape == (2, 3, S, S) and len(targets) == 2
    assert collate([None]) == (None, ())
    with pytest.raises(ValueError, match="one size"):
        collate([*_batch(1, 32), *_batch(1, 48)])
    with pytest.raises(ValueError, match="positive"):
        MultiScaleCollate((0, 32))


def test_coco_category_remap_round_trip():
    ids = torch.tensor(COCO_CATEGORY_IDS)
    assert len(ids) == 80 and ids.unique().numel() == 80 and ids.min() == 1 and ids.max() == 90
    assert not set(COCO_CATEGORY_IDS) & {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    remap = CategoryMap.coco()
    assert remap.num_classes == 80
    labels = remap.to_label(torch.tensor([1, 11, 13, 90, 27]))
    assert labels.tolist() == [0, 10, 11, 79, 24]
    assert torch.equal(remap.to_label(ids), torch.arange(80))
    assert torch.equal(remap.to_category(torch.arange(80)), ids)
    for bad in (12, 0, 91, -1):
        with pytest.raises(DatasetError, match=f"category id {bad} "):
            remap.to_label(torch.tensor([1, bad]))
    with pytest.raises(ValueError, match="0..79"):
        remap.to_category(torch.tensor([80]))


def test_custom_category_ids_and_transform_form():
    class _Coco:
        def getCatIds(self):  # noqa: N802 (pycocotools' name)
            return [100, 7, 3]

    remap = CategoryMap.from_coco_api(_Coco())
    assert remap.category_ids == (3, 7, 100) and remap.num_classes == 3
    assert remap.to_label(torch.tensor([7, 100, 3])).tolist() == [1, 2, 0]
    assert remap.to_category(torch.tensor([[2, 0]])).tolist() == [[100, 3]]
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    _, target = RTDETREvalTransform((S, S), category_map=remap)(image, _target([[1, 1, 9, 9]], labels=[100]))
    assert target["labels"].tolist() == [2]
    with pytest.raises(ValueError, match="duplicate"):
        CategoryMap([1, 1])
    with pytest.raises(ValueError, match="at least one"):
        CategoryMap([])
