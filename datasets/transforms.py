"""Box- and mask-aware augmentation for DETR, built on torchvision.transforms.v2 and tv_tensors.

Every transform is a callable ``(image, target) -> (image, target)``. ``image`` is a PIL image or a
[C, H, W] tensor (its type is kept until :class:`ToTensor` / :class:`Normalize`); ``target`` is ``None`` or
the plain-tensor dict of the published API: 'boxes' [T, 4] absolute (x0, y0, x1, y1) pixels, 'labels' [T],
'area' [T], 'iscrowd' [T], optional 'masks' [T, H, W], 'size' [2] (h, w). Boxes and masks are wrapped as
tv_tensors internally so the library moves them with the image; only the DETR-specific pieces (the
short-side/long-side size rule, the random choices, dropping empty boxes and the final normalised
(cx, cy, w, h) output) are written here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from util.box_ops import box_xyxy_to_cxcywh

Target = dict[str, Any]
ImageLike = PIL.Image.Image | Tensor

# Fields with one entry per instance: kept aligned when instances are dropped.
PER_INSTANCE_KEYS = ("boxes", "labels", "area", "iscrowd", "masks", "keypoints")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_size_with_aspect_ratio(
    image_size_wh: tuple[int, int], size: int, max_size: int | None = None
) -> tuple[int, int]:
    """DETR's resize rule: the output (h, w) for a short side of ``size`` and a long side of at most ``max_size``.

    If the long side would exceed ``max_size``, the short side becomes ``int(round(max_size * short / long))``.
    An image whose short side already equals that value keeps its size; otherwise the short side becomes
    the value and the long side ``int(value * long / short)`` (truncated, as published).

    Args:
        image_size_wh: (width, height) of the input image.
        size: target short side.
        max_size: limit of the long side, or None.

    Returns:
        (height, width) of the resized image.
    """
    w, h = image_size_wh
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _image_hw(image: ImageLike) -> tuple[int, int]:
    height, width = F.get_size(image)
    return height, width


def _plain(tensor: Tensor) -> Tensor:
    return tensor.as_subclass(Tensor)


def _boxes(target: Target, canvas_hw: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas_hw)


def select_instances(target: Target, keep: Tensor) -> Target:
    """Return a copy of ``target`` with only the instances where ``keep`` [T] (bool) is True."""
    target = dict(target)
    for key in PER_INSTANCE_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


def sanitize(target: Target) -> Target:
    """Drop instances whose box has no area (x1 <= x0 or y1 <= y0), keeping every per-instance field aligned.

    Without boxes, instances whose mask is empty are dropped instead.
    """
    if "boxes" in target:
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    elif "masks" in target:
        keep = target["masks"].flatten(1).any(1).bool()
    else:
        return target
    return select_instances(target, keep)


def hflip(image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
    """Mirror the image, its boxes and masks left-right."""
    flipped = F.horizontal_flip(image)
    if target is None:
        return flipped, None
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = _plain(F.horizontal_flip(_boxes(target, _image_hw(image))))
    if "masks" in target:
        target["masks"] = _plain(F.horizontal_flip(tv_tensors.Mask(target["masks"])))
    return flipped, target


def crop(image: ImageLike, target: Target | None, region: Sequence[int]) -> tuple[ImageLike, Target | None]:
    """Crop ``region`` = (top, left, height, width); boxes are clipped and those left empty are dropped.

    'area' is recomputed: the mask pixel count with masks, else the clipped box area.
    """
    top, left, height, width = (int(v) for v in region)
    cropped = F.crop(image, top, left, height, width)
    if target is None:
        return cropped, None
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        boxes = _plain(F.crop(_boxes(target, _image_hw(image)), top, left, height, width))
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if "masks" in target:
        masks = _plain(F.crop(tv_tensors.Mask(target["masks"]), top, left, height, width))
        target["masks"] = masks
        target["area"] = masks.flatten(1).sum(1).to(torch.float32)
    return cropped, sanitize(target)


def resize(
    image: ImageLike, target: Target | None, size: int | Sequence[int], max_size: int | None = None
) -> tuple[ImageLike, Target | None]:
    """Resize by DETR's rule (``size`` = short side, long side <= ``max_size``) or to an explicit (w, h) pair.

    Boxes scale with the image, 'area' by the product of both ratios (published behaviour), masks by
    nearest neighbour; 'size' becomes the new (h, w).
    """
    in_h, in_w = _image_hw(image)
    if isinstance(size, Sequence):
        out_h, out_w = int(size[1]), int(size[0])  # published convention: an explicit size is (w, h)
    else:
        out_h, out_w = get_size_with_aspect_ratio((in_w, in_h), int(size), max_size)
    resized = F.resize(image, [out_h, out_w], antialias=True)
    if target is None:
        return resized, None
    target = dict(target)
    target["size"] = torch.tensor([out_h, out_w], dtype=torch.int64)
    if "boxes" in target:
        target["boxes"] = _plain(F.resize(_boxes(target, (in_h, in_w)), [out_h, out_w]))
    if "area" in target:
        target["area"] = target["area"] * (out_w / in_w * out_h / in_h)
    if "masks" in target:
        target["masks"] = _plain(F.resize(tv_tensors.Mask(target["masks"]), [out_h, out_w]))
    return resized, target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[Any, Target | None]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    """Mirror image, boxes and masks with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Resize to a short side drawn uniformly from ``sizes`` (long side <= ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
        size = self.sizes[int(torch.randint(len(self.sizes), ()).item())]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose sides are drawn from [min_size, max_size] (capped by the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
        img_h, img_w = _image_hw(image)
        height = _randint(min(self.min_size, img_h), min(img_h, self.max_size))
        width = _randint(min(self.min_size, img_w), min(img_w, self.max_size))
        top = _randint(0, img_h - height)
        left = _randint(0, img_w - width)
        return crop(image, target, (top, left, height, width))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included) from torch's generator (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()).item())


class RandomSelect:
    """Apply ``transforms1`` with probability ``p``, otherwise ``transforms2``."""

    def __init__(self, transforms1: Callable, transforms2: Callable, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[Any, Target | None]:
        if torch.rand(()).item() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p},\n  {self.transforms1},\n  {self.transforms2})"


class SanitizeBoxes:
    """Drop instances whose box has no area, keeping labels/area/iscrowd/masks aligned (see :func:`sanitize`)."""

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
        return image, None if target is None else sanitize(target)


def to_float_image(image: ImageLike) -> Tensor:
    """PIL image or integer/float [C, H, W] tensor -> plain float32 [C, H, W] tensor in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = F.pil_to_tensor(image)
    image = _plain(image)
    if image.dtype == torch.float32:
        return image
    return F.to_dtype(image, torch.float32, scale=True)


class ToTensor:
    """PIL image or integer tensor -> float32 [C, H, W] tensor in [0, 1] (target unchanged)."""

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[Tensor, Target | None]:
        return to_float_image(image), target


class Normalize:
    """Standardise the image with ``mean``/``std`` and turn boxes into normalised (cx, cy, w, h).

    Accepts PIL images, uint8/uint16 tensors (scaled to [0, 1] first, fused with the normalisation) and
    float tensors in [0, 1]. Output boxes are relative to this (unpadded) image, in [0, 1].
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: ImageLike, target: Target | None) -> tuple[Tensor, Target | None]:
        if isinstance(image, PIL.Image.Image):
            image = F.pil_to_tensor(image)
        image = _plain(image)
        scale = 1.0 if image.is_floating_point() else float(torch.iinfo(image.dtype).max)
        mean = torch.tensor(self.mean).mul_(scale).view(-1, 1, 1)
        inv_std = torch.tensor(self.std).mul_(scale).reciprocal_().view(-1, 1, 1)
        image = image.to(torch.float32).sub_(mean).mul_(inv_std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            height, width = image.shape[-2:]
            scale_xyxy = torch.tensor([width, height, width, height], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale_xyxy
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def scaled(size: float, scale: float) -> int:
    """A published pixel size multiplied by ``scale`` (--input_scale), rounded, at least 1."""
    return max(1, int(math.floor(size * scale + 0.5)))
