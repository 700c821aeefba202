"""RT-DETRv2's published data pipeline: transforms.v2 augmentation, batch-level multi-scale, category remap.

Input of the sample transforms is what :class:`datasets.coco.CocoDetection` hands its transforms: a PIL
image or a uint8 [3, H, W] tensor, and the target dict of :class:`datasets.coco.ConvertCocoPolysToMask`
('boxes' float32 [T, 4] absolute (x0, y0, x1, y1) pixels, 'labels' int64 [T] raw category ids, 'area',
'iscrowd' [T], 'image_id', 'orig_size', 'size' (h, w)). Output: a float32 [3, H, W] image in [0, 1] (no
mean/std) and the target with 'boxes' normalised (cx, cy, w, h), 'labels' mapped to 0..K-1 when a
:class:`CategoryMap` is given, 'area' the output box areas in pixels, 'size' the output (h, w).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datasets.errors import DatasetError
from util.box_ops import box_xyxy_to_cxcywh
from util.misc import NestedTensor

Target = dict[str, Any]
ImageLike = PIL.Image.Image | Tensor

# The 80 category ids of the COCO 2017 detection annotations (1..90 with ten unused ids).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91),
)  # fmt: skip

# Per-instance fields that SanitizeBoundingBoxes keeps aligned with the boxes (masks are found by type).
_INSTANCE_FIELDS = ("labels", "area", "iscrowd")

# The published multi-scale sizes (--multiscale_sizes): 640 three times, so it is drawn more often.
PUBLISHED_MULTISCALE_SIZES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


class CategoryMap:
    """Category ids <-> contiguous labels: label = index of the id among the sorted ids (published remap).

    Args:
        category_ids: the dataset's category ids (any order, any gaps; no duplicates).
    """

    def __init__(self, category_ids: Iterable[int]):
        ids = [int(i) for i in category_ids]
        if not ids:
            raise ValueError("a category map needs at least one category id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids in {sorted(ids)}")
        if min(ids) < 0:
            raise ValueError(f"category ids must be >= 0, got {min(ids)}")
        self.category_ids = tuple(sorted(ids))
        self._to_label = torch.full((self.category_ids[-1] + 1,), -1, dtype=torch.int64)
        self._to_label[list(self.category_ids)] = torch.arange(len(ids))
        self._to_category = torch.tensor(self.category_ids, dtype=torch.int64)

    @classmethod
    def coco(cls) -> CategoryMap:
        """The published ``remap_mscoco_category`` map of the 80 COCO ids to labels 0..79."""
        return cls(COCO_CATEGORY_IDS)

    @classmethod
    def from_coco_api(cls, coco: Any) -> CategoryMap:
        """The map of a COCO-format dataset's own categories (a pycocotools ``COCO`` index)."""
        return cls(coco.getCatIds())

    @property
    def num_classes(self) -> int:
        """Number of categories K (labels are 0..K-1)."""
        return len(self.category_ids)

    def to_label(self, category_ids: Tensor) -> Tensor:
        """int [...] category ids -> int64 [...] labels in 0..K-1.

        Raises:
            DatasetError: an id is not one of the map's categories.
        """
        ids = torch.as_tensor(category_ids, dtype=torch.int64)
        inside = (ids >= 0) & (ids < len(self._to_label))
        labels = self._to_label[ids.clamp(0, len(self._to_label) - 1)]
        bad = ~inside | (labels < 0)
        if bad.any():
            raise DatasetError(
                f"category id {int(ids[bad][0])} is not one of the dataset's {self.num_classes} categories"
            )
        return labels.to(ids.device)

    def to_category(self, labels: Tensor) -> Tensor:
        """int [...] labels in 0..K-1 -> int64 [...] category ids (for the post-processor's output)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        return self._to_category.to(labels.device)[labels]

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
        """Sample transform: remap ``target['labels']`` from category ids to labels."""
        if target is None:
            return image, None
        return image, {**target, "labels": self.to_label(target["labels"])}


def _instance_fields(inputs: Any) -> tuple[Tensor, ...]:
    # SanitizeBoundingBoxes labels_getter: every per-instance tensor of the target follows the boxes.
    target = inputs[1]
    return tuple(target[key] for key in _INSTANCE_FIELDS if key in target)


def _to_v2(image: ImageLike, target: Target) -> tuple[Any, Target]:
    if isinstance(image, Tensor):
        image = tv_tensors.Image(image)
    height, width = F.get_size(image)
    target = dict(target)
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
    if "masks" in target:
        target["masks"] = tv_tensors.Mask(target["masks"])
    return image, target


def _finish(image: Any, target: Target | None) -> tuple[Tensor, Target | None]:
    """v2 sample -> float [3, H, W] in [0, 1] and plain tensors with normalised (cx, cy, w, h) boxes."""
    image = F.to_dtype(F.to_image(image), torch.float32, scale=True).as_subclass(Tensor)
    if target is None:
        return image, None
    height, width = image.shape[-2:]
    target = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
    boxes = target["boxes"]
    target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    target["boxes"] = box_xyxy_to_cxcywh(boxes) / scale
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image, target


class RTDETRTrainTransform:
    """The published train pipeline; photometric distortion, zoom-out and IoU crop stop at ``aug_stop_epoch``.

    Order: RandomPhotometricDistort(p 0.5), RandomZoomOut(fill 0), RandomIoUCrop with p ``iou_crop_p``,
    SanitizeBoundingBoxes(min_size 1), RandomHorizontalFlip, Resize(``size``) (aspect not kept),
    SanitizeBoundingBoxes(min_size 1), float /255, normalised (cx, cy, w, h) boxes.

    Args:
        size: output (height, width), published (640, 640).
        aug_stop_epoch: first epoch without the first three ops (None: never stop).
        category_map: remaps 'labels' from category ids first (None: labels kept).
        iou_crop_p: probability of the IoU crop (published 0.8).

    The epoch is set by :meth:`set_epoch`; DataLoader workers hold copies, so call it before the epoch's
    iterator is created (workers not persistent, as published).
    """

    def __init__(
        self,
        size: tuple[int, int] = (640, 640),
        aug_stop_epoch: int | None = None,
        category_map: CategoryMap | None = None,
        iou_crop_p: float = 0.8,
    ):
        self.size = (int(size[0]), int(size[1]))
        self.aug_stop_epoch = aug_stop_epoch
        self.category_map = category_map
        self.epoch = 0
        self.augment = [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill=0),
            v2.RandomApply([v2.RandomIoUCrop()], p=iou_crop_p),
        ]
        self.geometry = [
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_instance_fields),
            v2.RandomHorizontalFlip(),
            v2.Resize(self.size),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_instance_fields),
        ]

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next samples (decides whether the first three ops run)."""
        self.epoch = int(epoch)

    @property
    def augmenting(self) -> bool:
        """True while photometric distortion, zoom-out and IoU crop are applied."""
        return self.aug_stop_epoch is None or self.epoch < self.aug_stop_epoch

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        """(image, target) -> (float [3, H, W] in [0, 1], target with normalised (cx, cy, w, h) boxes)."""
        if self.category_map is not None:
            image, target = self.category_map(image, target)
        sample = _to_v2(image, target)
        for op in (self.augment if self.augmenting else []) + self.geometry:
            sample = op(sample)
        return _finish(*sample)

    def __repr__(self) -> str:
        ops = ",\n  ".join(repr(op) for op in self.augment + self.geometry)
        return f"{type(self).__name__}(aug_stop_epoch={self.aug_stop_epoch}, epoch={self.epoch},\n  {ops})"


class RTDETREvalTransform:
    """The published eval pipeline: Resize(``size``) (aspect not kept), float /255, normalised boxes."""

    def __init__(self, size: tuple[int, int] = (640, 640), category_map: CategoryMap | None = None):
        self.size = (int(size[0]), int(size[1]))
        self.category_map = category_map
        self.resize = v2.Resize(self.size)

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[Tensor, Target | None]:
        """(image, target or None) -> (float [3, H, W] in [0, 1], target with normalised (cx, cy, w, h) boxes)."""
        if target is None:
            image = tv_tensors.Image(image) if isinstance(image, Tensor) else image
            return _finish(self.resize(image), None)
        if self.category_map is not None:
            image, target = self.category_map(image, target)
        return _finish(*self.resize(_to_v2(image, target)))


def build_rtdetr_transforms(
    image_set: str,
    *,
    size: tuple[int, int] = (640, 640),
    aug_stop_epoch: int | None = None,
    category_map: CategoryMap | None = None,
) -> RTDETRTrainTransform | RTDETREvalTransform:
    """The train ('train') or eval ('val') transform of the published recipe."""
    if image_set == "train":
        return RTDETRTrainTransform(size, aug_stop_epoch=aug_stop_epoch, category_map=category_map)
    if image_set == "val":
        return RTDETREvalTransform(size, category_map=category_map)
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")


class MultiScaleCollate:
    """Batch collation with the published multi-scale training: stack, then resize the batch to a random square.

    While ``epoch < stop_epoch`` each batch is resized (nearest, ``F.interpolate``) to ``size x size`` with
    ``size = random.choice(sizes)`` (Python's ``random``, seeded per DataLoader worker); boxes are normalised
    and stay as they are. ``None`` samples (skipped unreadable images) are dropped like in
    :func:`util.misc.collate_fn`.

    Args:
        sizes: square sizes to draw from; empty or None turns multi-scale off.
        stop_epoch: first epoch at the transform's size (None: never stop).
        nested: return a :class:`util.misc.NestedTensor` with an all-False mask (else a plain tensor).

    Returns (of a call):
        (images [B, 3, S, S] as NestedTensor or tensor, tuple of targets), or (None, ()) for an empty batch.
    """

    def __init__(self, sizes: Sequence[int] | None = None, stop_epoch: int | None = None, nested: bool = True):
        self.sizes = tuple(int(s) for s in sizes or ())
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f"multi-scale sizes must be positive, got {list(self.sizes)}")
        self.stop_epoch = stop_epoch
        self.nested = nested
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next batches (set before the epoch's DataLoader iterator is created)."""
        self.epoch = int(epoch)

    @property
    def active(self) -> bool:
        """True while batches are resized to random sizes."""
        return bool(self.sizes) and (self.stop_epoch is None or self.epoch < self.stop_epoch)

    def __call__(self, batch: Sequence[tuple[Tensor, Target] | None]) -> tuple[NestedTensor | Tensor | None, tuple]:
        batch = [sample for sample in batch if sample is not None]
        if not batch:
            return None, ()
        images, targets = zip(*batch)
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch must have one size to stack, got {sorted(shapes)}")
        stacked = torch.stack(images)
        if self.active:
            size = random.choice(self.sizes)
            stacked = nnf.interpolate(stacked, size=size)
            targets = tuple({**t, "size": torch.tensor([size, size], dtype=torch.int64)} for t in targets)
        if not self.nested:
            return stacked, tuple(targets)
        mask = torch.zeros((stacked.shape[0], *stacked.shape[-2:]), dtype=torch.bool)
        return NestedTensor(stacked, mask), tuple(targets)
