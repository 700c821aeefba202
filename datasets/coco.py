"""COCO detection dataset: COCO annotations -> DETR targets, the published augmentation, and ``build``.

Targets (DESIGN 1): 'boxes' float32 [T, 4], 'labels' int64 [T] (raw category ids), 'image_id' int64 [1],
'area' float32 [T], 'iscrowd' int64 [T], 'orig_size' and 'size' int64 [2] as (h, w), and with masks
'masks' uint8 [T, H, W]. Boxes are absolute (x0, y0, x1, y1) pixels after :class:`ConvertCocoPolysToMask`
and normalised (cx, cy, w, h) in [0, 1] after the transforms of :func:`make_coco_transforms`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

import datasets.transforms as T
from datasets.coco_io import (
    coco_api_from_json,
    invalid_box_annotations,
    load_coco_json,
    negative_size_box_annotations,
    read_image_rgb,
    segmentation_problem,
)
from datasets.errors import DatasetError
from datasets.settings import DataSettings
from datasets.skipping import SkippingDataset

logger = logging.getLogger(__name__)
# Flags naming the user's data: any of them means the generated dataset is never substituted.
DATA_PATH_FLAGS = ("coco_path", "train_img_folder", "train_ann_file", "val_img_folder", "val_ann_file")


def convert_coco_poly_to_mask(segmentations: list[Any], height: int, width: int) -> Tensor:
    """COCO segmentations (polygon lists or RLE dicts) -> uint8 [T, height, width] masks."""
    masks = []
    for segmentation in segmentations:
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            rles = [segmentation]  # compressed RLE: already in pycocotools' format
        elif isinstance(segmentation, dict):
            rles = [mask_utils.frPyObjects(segmentation, height, width)]  # uncompressed RLE
        else:
            # Polygons need 3 points; shorter ones (a few exist in COCO) would be misread as boxes.
            polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
            if not polygons:
                masks.append(torch.zeros((height, width), dtype=torch.uint8))
                continue
            rles = mask_utils.frPyObjects(polygons, height, width)
        decoded = mask_utils.decode(rles)
        if decoded.ndim == 3:
            decoded = decoded.any(axis=2)
        masks.append(torch.as_tensor(decoded, dtype=torch.uint8))
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    return torch.stack(masks)


class ConvertCocoPolysToMask:
    """(image, {'image_id', 'annotations'}) -> (image, target): COCO annotations to a DETR target.

    Crowd annotations are dropped, boxes go from (x, y, w, h) to (x0, y0, x1, y1) clamped to the image,
    boxes without area are removed, labels are the raw category ids; with ``return_masks`` the polygon or
    RLE segmentations become uint8 [T, H, W] masks.
    """

    def __init__(self, return_masks: bool = False):
        self.return_masks = return_masks

    def __call__(self, image: PIL.Image.Image | Tensor, target: dict[str, Any]) -> tuple[Any, dict[str, Tensor]]:
        height, width = T._image_hw(image)
        annotations = [a for a in target["annotations"] if a.get("iscrowd", 0) == 0]

        boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        areas = [a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in annotations]
        out = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
            "image_id": torch.tensor([target["image_id"]], dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(annotations), dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.return_masks:
            missing = [a["id"] for a in annotations if a.get("segmentation") is None]
            if missing:
                raise DatasetError(f"annotation id {missing[0]} has no 'segmentation'; --masks needs instance masks")
            for a in annotations:  # load_coco_json checked the types; the content is checked where it is used
                problem = segmentation_problem(a["segmentation"], height, width)
                if problem:
                    raise DatasetError(f"annotation id {a['id']}: {problem}")
            out["masks"] = convert_coco_poly_to_mask([a["segmentation"] for a in annotations], height, width)
        # NaN boxes compare False, so they are dropped here too.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return image, T.select_instances(out, keep)


class CocoDetection(SkippingDataset):
    """COCO-format detection dataset (pycocotools index) returning ``(image, target)`` pairs.

    Args:
        img_folder: folder of the images named by 'file_name'.
        ann_file: COCO instances JSON.
        transforms: callable ``(image, target) -> (image, target)`` or None.
        return_masks: add 'masks' to the targets.
        skip_bad_images: on an unreadable sample (missing, corrupt, wrong size) log a one-line warning and
            skip it instead of raising :class:`DatasetError`; images with invalid boxes are excluded at start.
        substitute_bad: when skipping, return the next readable sample (training: constant batch size, so
            distributed ranks stay in step) instead of ``None`` (evaluation: ``util.misc.collate_fn`` drops it).
        decoder: 'auto' / 'torchvision' (uint8 tensors) or 'pil' (PIL images, the published path).

    Attributes:
        coco: the pycocotools ``COCO`` index (``get_coco_api_from_dataset`` returns it).
        ids: image ids in sample order.
        skipped: number of samples skipped so far, summed over DataLoader workers.
        excluded_ids: image ids left out at start because of invalid boxes (only with ``skip_bad_images``).
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_file: str | Path,
        transforms: Any,
        return_masks: bool,
        *,
        skip_bad_images: bool = False,
        substitute_bad: bool = False,
        decoder: str = "auto",
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.img_folder.is_dir():
            raise DatasetError(f"{self.img_folder}: image folder not found (check --coco_path or *_img_folder)")
        data = load_coco_json(self.ann_file)
        self.coco = coco_api_from_json(data)
        self._transforms = transforms
        self.prepare = ConvertCocoPolysToMask(return_masks)
        super().__init__(skip_bad_images, substitute_bad)
        self.decoder = decoder
        self.excluded_ids = self._check_boxes(data)
        self.ids = sorted(set(self.coco.imgs) - set(self.excluded_ids))

    @property
    def transforms(self) -> Any:
        """The sample transforms; assignable (a family's own pipeline, ``Family.data_transforms``)."""
        return self._transforms

    @transforms.setter
    def transforms(self, value: Any) -> None:
        self._transforms = value

    def _check_boxes(self, data: dict[str, Any]) -> list[int]:
        negative = negative_size_box_annotations(data)
        if negative:  # the published code drops them (like zero-size boxes) and trains on: one warning per file
            first = negative[0]
            logger.warning(
                "warning: %s: dropping %d annotation(s) with negative width/height (first: id %s, bbox %s)",
                self.ann_file,
                len(negative),
                first["id"],
                first["bbox"],
            )
        bad = invalid_box_annotations(data, negative=False)
        if not bad:
            return []
        first = bad[0]
        problem = f"annotation id {first['id']} (image id {first['image_id']}) has bbox {first['bbox']}"
        if not self.skip_bad_images:
            raise DatasetError(f"{self.ann_file}: {problem} with NaN/inf; fix it or pass --skip_bad_images")
        excluded = sorted({a["image_id"] for a in bad})
        logger.warning(
            "%s: skipping %d image(s) with invalid boxes (%d annotations; first: %s)",
            self.ann_file,
            len(excluded),
            len(bad),
            problem,
        )
        return excluded

    def __len__(self) -> int:
        return len(self.ids)

    def load_sample(self, index: int) -> tuple[Any, dict[str, Tensor]]:
        """Decode, check and transform sample ``index`` (no skipping).

        Raises:
            DatasetError: naming the image file and the problem.
        """
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_folder / info["file_name"]
        image = read_image_rgb(path, self.decoder)
        height, width = T._image_hw(image)
        if (height, width) != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {width}x{height} but {self.ann_file.name} says {info['width']}x{info['height']} "
                "(width x height); fix the annotation file"
            )
        try:
            image, target = self.prepare(image, {"image_id": image_id, "annotations": self.coco.imgToAnns[image_id]})
        except DatasetError as err:
            raise DatasetError(f"{self.ann_file}: {err} (image {path})") from None
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target


def make_coco_transforms(image_set: str, input_scale: float = 1.0) -> T.Compose:
    """The published DETR augmentation, with every pixel size multiplied by ``input_scale``.

    train: horizontal flip, then either a resize of the short side to one of 480..800 (step 32, long side
    <= 1333) or [short side 400/500/600, random crop of 384..600, the same multi-scale resize];
    val: short side 800, long side <= 1333. Both end with ImageNet normalisation and normalised
    (cx, cy, w, h) boxes.
    """
    scales = [T.scaled(s, input_scale) for s in range(480, 801, 32)]
    max_size = T.scaled(1333, input_scale)
    normalize = T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)
    if image_set == "train":
        return T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandomSelect(
                    T.RandomResize(scales, max_size=max_size),
                    T.Compose(
                        [
                            T.RandomResize([T.scaled(s, input_scale) for s in (400, 500, 600)]),
                            T.RandomSizeCrop(T.scaled(384, input_scale), T.scaled(600, input_scale)),
                            T.RandomResize(scales, max_size=max_size),
                        ]
                    ),
                ),
                normalize,
            ]
        )
    if image_set == "val":
        return T.Compose([T.RandomResize([T.scaled(800, input_scale)], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")


def coco_paths(image_set: str, data: DataSettings) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split: the explicit flags, else the COCO layout under the root.

    The root is --coco_path, or the generated synthetic dataset for --dataset_file synthetic or when none of
    --coco_path and the explicit path flags is given. Once the user names data, the generated dataset never
    stands in for a missing split (an error says what to pass).
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
    img_folder = data.img_folder(image_set)
    ann_file = data.ann_file(image_set)
    given = [f"--{flag}" for flag in DATA_PATH_FLAGS if getattr(data, flag) is not None]
    if data.dataset_file == "synthetic" and given:
        raise DatasetError(
            f"--dataset_file synthetic trains on the generated data, but {', '.join(given)} names other data; "
            "pass --dataset_file coco to use it, or drop the path"
        )
    if data.dataset_file == "synthetic" or not given:
        from datasets.synthetic import ensure_synthetic_dataset

        root = ensure_synthetic_dataset(data.synthetic_dir, data.synthetic_train_size, data.synthetic_val_size)
        return root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json"
    if data.coco_path is not None:
        root = Path(data.coco_path)
        if not root.exists():
            raise DatasetError(f"provided COCO path {root} does not exist")
        if not root.is_dir():
            raise DatasetError(
                f"--coco_path {root} is a file; pass the folder holding train2017/, val2017/ and annotations/ "
                "(or name single files with --train_ann_file / --val_ann_file and the *_img_folder flags)"
            )
        img_folder = img_folder or root / f"{image_set}2017"
        ann_file = ann_file or root / "annotations" / f"instances_{image_set}2017.json"
    if img_folder is None or ann_file is None:
        missing = f"--{image_set}_img_folder" if img_folder is None else f"--{image_set}_ann_file"
        if image_set == "val" and img_folder is None and ann_file is None:
            raise DatasetError(
                f"{', '.join(given)} without validation data: pass --val_img_folder and --val_ann_file (the train "
                "ones to evaluate on the training split); the generated data is never used in their place"
            )
        raise DatasetError(f"{missing} is needed when --coco_path is not given")
    return Path(img_folder), Path(ann_file)


def build(image_set: str, data: DataSettings) -> CocoDetection:
    """The COCO (or synthetic, or custom COCO-format) detection dataset of split 'train' or 'val'.

    Reads --coco_path / --{train,val}_{img_folder,ann_file}, --masks, --input_scale and --skip_bad_images
    (training replaces a skipped sample by the next one; evaluation drops it). The published
    --remove_difficult flag is accepted and, as published, has no effect on COCO.
    """
    img_folder, ann_file = coco_paths(image_set, data)
    skip = data.skip_bad_images
    return CocoDetection(
        img_folder,
        ann_file,
        transforms=make_coco_transforms(image_set, data.input_scale),
        return_masks=data.masks,
        skip_bad_images=skip,
        substitute_bad=skip and image_set == "train",
    )
