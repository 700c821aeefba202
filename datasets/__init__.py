"""Datasets: ``build_dataset(image_set, args)``, ``get_coco_api_from_dataset``, ``num_classes_for``.

Both builders take the parsed flags (``args`` or a ``DataSettings``); below them only ``DataSettings`` travels.

--dataset_file: 'coco' (a COCO-format folder via --coco_path or the explicit path flags; without any, the
generated synthetic dataset), 'synthetic' (always the generated dataset) or 'coco_panoptic'.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from datasets import coco
from datasets.coco_io import load_coco_json, max_category_id
from datasets.errors import DatasetError
from datasets.settings import DataSettings

__all__ = [
    "DataSettings",
    "DatasetError",
    "build_dataset",
    "category_ids_for",
    "get_coco_api_from_dataset",
    "num_classes_for",
    "skipped_samples",
]

DATASET_FILES = ("coco", "synthetic", "coco_panoptic")
# Classifier size when args.num_classes is None: the published values (models fall back to the same).
_DEFAULT_NUM_CLASSES = {"coco": 91, "synthetic": 91, "coco_panoptic": 250}


def get_coco_api_from_dataset(dataset: Any) -> Any:
    """The pycocotools ``COCO`` index behind ``dataset`` (``torch.utils.data.Subset`` wrappers unwrapped).

    Returns None for a dataset without one, as published.
    """
    return getattr(_unwrap(dataset), "coco", None)


def _unwrap(dataset: Any) -> Any:
    for _ in range(10):
        if not isinstance(dataset, torch.utils.data.Subset):
            break
        dataset = dataset.dataset
    return dataset


def skipped_samples(dataset: Any) -> int:
    """Samples skipped so far with --skip_bad_images (summed over DataLoader workers; 0 if not tracked).

    The count lives in shared memory, so it is read here in the main process while workers add to it.
    Per process: sum it over ranks if a global figure is wanted.
    """
    return int(getattr(_unwrap(dataset), "skipped", 0))


def data_settings(args: argparse.Namespace | DataSettings) -> DataSettings:
    """The data flags of parsed command-line ``args`` (a DataSettings is returned as it is)."""
    settings = args if isinstance(args, DataSettings) else DataSettings.from_flags(vars(args))
    if settings.dataset_file not in DATASET_FILES:
        raise DatasetError(f"--dataset_file {settings.dataset_file!r} is not supported; use one of {DATASET_FILES}")
    return settings


def num_classes_for(args: argparse.Namespace | DataSettings) -> int:
    """Classifier size: --num_classes if given; 250 for coco_panoptic (published); else the largest category
    id of the training annotation file + 1 (91 for COCO)."""
    settings = data_settings(args)
    if settings.num_classes is not None:
        return int(settings.num_classes)
    if settings.dataset_file == "coco_panoptic":
        return _DEFAULT_NUM_CLASSES["coco_panoptic"]
    split = "train"
    if settings.eval and settings.coco_path is None and not (settings.train_img_folder or settings.train_ann_file):
        split = "val"  # --eval on explicit val files: no training split to read
    _, ann_file = coco.coco_paths(split, settings)
    return max_category_id(load_coco_json(ann_file), ann_file) + 1


def category_ids_for(args: argparse.Namespace | DataSettings) -> list[int]:
    """The sorted category ids of the training annotation file (of the validation file with --eval only)."""
    settings = data_settings(args)
    split = "train"
    if settings.eval and settings.coco_path is None and not (settings.train_img_folder or settings.train_ann_file):
        split = "val"
    _, ann_file = coco.coco_paths(split, settings)
    categories = load_coco_json(ann_file).get("categories") or []
    if not categories:
        raise DatasetError(f"{ann_file}: no 'categories' to number the classes by")
    return sorted(int(c["id"]) for c in categories)


def build_dataset(image_set: str, args: argparse.Namespace | DataSettings) -> torch.utils.data.Dataset:
    """The dataset of split ``image_set`` ('train' or 'val') selected by ``args.dataset_file``.

    Raises:
        DatasetError: unknown dataset_file, missing/invalid files, or a category id >= num_classes (named
            with its annotation file) -- all at start-up, before any training.
    """
    settings = data_settings(args)
    if settings.dataset_file == "coco_panoptic":
        from datasets import coco_panoptic  # the panoptic engineer's module; imported only when used

        return coco_panoptic.build(image_set, settings)
    dataset = coco.build(image_set, settings)
    num_classes = settings.num_classes
    if num_classes is None:
        num_classes = _DEFAULT_NUM_CLASSES[settings.dataset_file]
    largest = max_category_id(dataset.coco.dataset, dataset.ann_file)
    if largest >= num_classes and not settings.remap_categories:
        raise DatasetError(
            f"{dataset.ann_file}: category id {largest} >= num_classes {num_classes}; "
            f"pass --num_classes {largest + 1} or higher (or leave it unset to infer it)"
        )
    return dataset
