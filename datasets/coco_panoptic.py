"""COCO panoptic dataset: ``panoptic_{split}2017.json`` + PNG folder -> DETR targets with one mask per segment.

Targets (DESIGN 1): 'masks' uint8 [T, H, W] (with ``return_masks``), 'labels' int64 [T] (category ids, things and
stuff), 'boxes' (absolute x0, y0, x1, y1 from each segment's bbox before the transforms, normalised cx, cy, w, h
after them), 'iscrowd' int64 [T], 'area' float32 [T], 'image_id' int64 [1], 'orig_size' and 'size' int64 [2]
(h, w). As published, crowd segments stay in the targets (with iscrowd 1).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import datasets.transforms as T
from datasets.coco import make_coco_transforms
from datasets.coco_io import coco_api_from_json, load_coco_json, load_coco_panoptic_json, read_image_rgb
from datasets.errors import DatasetError
from datasets.panoptic_quality import read_panoptic_png
from datasets.settings import DataSettings
from datasets.skipping import SkippingDataset

__all__ = ["CocoPanoptic", "build", "panoptic_paths"]

logger = logging.getLogger(__name__)


class CocoPanoptic(SkippingDataset):
    """COCO panoptic segmentation dataset returning ``(image, target)`` pairs.

    Args:
        img_folder: folder of the images named by the 'images' entries' file_name.
        ann_folder: folder of the panoptic PNGs named by the annotations' file_name.
        ann_file: ``panoptic_{split}2017.json``.
        transforms: callable ``(image, target) -> (image, target)`` or None.
        return_masks: add 'masks' to the targets.
        detection_ann_file: optional COCO instances JSON of the same images (box/mask AP); see ``coco``.
        skip_bad_images: warn and skip unreadable samples instead of raising DatasetError.
        substitute_bad: when skipping, return the next readable sample (training) instead of None (evaluation).

    Attributes:
        ann_file, ann_folder, img_folder: the paths above (PanopticEvaluator reads ann_file and ann_folder).
        is_thing_map: {category_id: True for things, False for stuff}, from the annotation file.
        panoptic: the loaded panoptic JSON.
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_folder: str | Path,
        ann_file: str | Path,
        transforms: Any = None,
        return_masks: bool = True,
        *,
        detection_ann_file: str | Path | None = None,
        skip_bad_images: bool = False,
        substitute_bad: bool = False,
    ):
        self.img_folder = Path(img_folder)
        self.ann_folder = Path(ann_folder)
        self.ann_file = Path(ann_file)
        for folder, flag in ((self.img_folder, "--coco_path"), (self.ann_folder, "--coco_panoptic_path")):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: folder not found (check {flag})")
        self.panoptic = load_coco_panoptic_json(self.ann_file)
        self.images = {int(image["id"]): image for image in self.panoptic["images"]}
        self.annotations = sorted(self.panoptic["annotations"], key=lambda a: int(a["image_id"]))
        unknown = [a["image_id"] for a in self.annotations if int(a["image_id"]) not in self.images]
        if unknown:
            raise DatasetError(f"{self.ann_file}: annotation for image_id {unknown[0]} has no entry in 'images'")
        self.is_thing_map = {int(c["id"]): bool(c.get("isthing", 1)) for c in self.panoptic["categories"]}
        self.detection_ann_file = None if detection_ann_file is None else Path(detection_ann_file)
        self._transforms = transforms
        self.return_masks = return_masks
        super().__init__(skip_bad_images, substitute_bad)
        self.ids = [int(a["image_id"]) for a in self.annotations]

    @cached_property
    def coco(self) -> Any:
        """pycocotools COCO index of the detection annotations (for bbox/segm AP), or None without them."""
        if self.detection_ann_file is None or not self.detection_ann_file.is_file():
            return None
        return coco_api_from_json(load_coco_json(self.detection_ann_file))

    def __len__(self) -> int:
        return len(self.annotations)

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        """(height, width) of sample ``index`` from the annotation file."""
        image = self.images[int(self.annotations[index]["image_id"])]
        return int(image["height"]), int(image["width"])

    def load_sample(self, index: int) -> tuple[Any, dict[str, Tensor]]:
        """Decode sample ``index`` and build its target (no skipping).

        Raises:
            DatasetError: naming the image or PNG file and the problem.
        """
        annotation = self.annotations[index]
        image_id = int(annotation["image_id"])
        info = self.images[image_id]
        image = read_image_rgb(self.img_folder / info["file_name"])
        height, width = T._image_hw(image)
        png_path = self.ann_folder / annotation["file_name"]
        try:
            ids = read_panoptic_png(png_path)
        except (OSError, ValueError) as err:
            raise DatasetError(f"{png_path}: cannot read the panoptic PNG ({err})") from None
        if ids.shape != (height, width):
            raise DatasetError(
                f"{png_path}: panoptic PNG is {ids.shape[1]}x{ids.shape[0]} but its image is {width}x{height}"
            )
        target = self.make_target(image_id, ids, annotation["segments_info"])
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target

    def make_target(self, image_id: int, ids: np.ndarray, segments: list[dict]) -> dict[str, Tensor]:
        """Target of one image from its [H, W] segment-id map and ``segments_info``."""
        height, width = ids.shape
        segment_ids = np.asarray([int(s["id"]) for s in segments], dtype=np.int64)
        masks = torch.from_numpy(ids[None] == segment_ids[:, None, None]).to(torch.uint8)
        boxes = torch.zeros((len(segments), 4), dtype=torch.float32)
        for k, segment in enumerate(segments):
            if "bbox" in segment:
                x, y, w, h = segment["bbox"]
                boxes[k] = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
            elif masks[k].any():
                ys, xs = torch.nonzero(masks[k], as_tuple=True)
                boxes[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        area = [float(s["area"]) if "area" in s else float(masks[k].sum()) for k, s in enumerate(segments)]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([int(s["category_id"]) for s in segments], dtype=torch.int64),
            "image_id": torch.tensor([image_id], dtype=torch.int64),
            "area": torch.tensor(area, dtype=torch.float32).reshape(-1),
            "iscrowd": torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.return_masks:
            target["masks"] = masks
        # Segments listed in the JSON but absent from the PNG have no pixels and no box: drop them.
        return T.select_instances(target, masks.flatten(1).amax(1) > 0)


def _first_dir(*candidates: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[0])


def panoptic_paths(image_set: str, data: DataSettings) -> dict[str, Path | None]:
    """Paths of a split: {'img_folder', 'ann_folder', 'ann_file', 'detection_ann_file'}.

    The panoptic root is --coco_panoptic_path, else --coco_path, else the generated synthetic dataset. Its
    ``annotations/panoptic_{split}2017.json`` is read with PNGs from ``panoptic_{split}2017/`` (published layout)
    or ``annotations/panoptic_{split}2017/`` (the zip's layout). Images come from --{split}_img_folder, else
    ``{split}2017/`` under --coco_path (or the panoptic root).
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
    split = f"{image_set}2017"
    panoptic_root = data.coco_panoptic_path or data.coco_path
    if panoptic_root is None:
        from datasets.synthetic import ensure_synthetic_dataset

        panoptic_root = ensure_synthetic_dataset(data.synthetic_dir, data.synthetic_train_size, data.synthetic_val_size)
    panoptic_root = Path(panoptic_root)
    if not panoptic_root.exists():
        raise DatasetError(f"provided COCO panoptic path {panoptic_root} does not exist")
    image_root = Path(data.coco_path) if data.coco_path else panoptic_root
    img_folder = data.img_folder(image_set) or image_root / split
    detection = data.ann_file(image_set) or image_root / "annotations" / f"instances_{split}.json"
    return {
        "img_folder": Path(img_folder),
        "ann_folder": _first_dir(
            panoptic_root / f"panoptic_{split}", panoptic_root / "annotations" / f"panoptic_{split}"
        ),
        "ann_file": panoptic_root / "annotations" / f"panoptic_{split}.json",
        "detection_ann_file": Path(detection),
    }


def build(image_set: str, data: DataSettings) -> CocoPanoptic:
    """The COCO panoptic (or synthetic panoptic) dataset of split 'train' or 'val'.

    Raises:
        DatasetError: missing files, or a category id >= --num_classes.
    """
    paths = panoptic_paths(image_set, data)
    skip = data.skip_bad_images
    dataset = CocoPanoptic(
        paths["img_folder"],
        paths["ann_folder"],
        paths["ann_file"],
        transforms=make_coco_transforms(image_set, data.input_scale),
        return_masks=data.masks,
        detection_ann_file=paths["detection_ann_file"],
        skip_bad_images=skip,
        substitute_bad=skip and image_set == "train",
    )
    num_classes = data.num_classes
    largest = max(dataset.is_thing_map, default=0)
    if num_classes is not None and largest >= num_classes:
        raise DatasetError(
            f"{dataset.ann_file}: category id {largest} >= num_classes {num_classes}; pass --num_classes {largest + 1}"
        )
    return dataset
