"""RT-DETRv2's data pipeline for the framework (``Family.data_transforms`` / ``batch_collate`` /
``contiguous_labels``): the published transforms.v2 pipeline and batch-level multi-scale of
``datasets.rtdetr_transforms``, sized by ``--eval_spatial_size`` (640 x 640 published)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .settings import RTDETRv2Settings

__all__ = ["batch_collate", "contiguous_labels", "data_transforms", "input_size"]

_PUBLISHED_SIZE = (640, 640)


def input_size(settings: RTDETRv2Settings) -> tuple[int, int]:
    """(H, W) every image is resized to: --eval_spatial_size, or the published 640 x 640 without one."""
    size = settings.eval_spatial_size
    return (int(size[0]), int(size[1])) if size else _PUBLISHED_SIZE


def contiguous_labels(settings: RTDETRv2Settings) -> bool:
    """--remap_mscoco_category: labels are indices of the dataset's sorted category ids (COCO: 0..79)."""
    return bool(settings.remap_mscoco_category)


def data_transforms(image_set: str, settings: RTDETRv2Settings, category_map: Any = None) -> Callable:
    """The published train pipeline (its first three ops stop at --aug_stop_epoch) or the eval resize."""
    from datasets.rtdetr_transforms import build_rtdetr_transforms  # the data layer, only when data is loaded

    return build_rtdetr_transforms(
        image_set, size=input_size(settings), aug_stop_epoch=settings.aug_stop_epoch, category_map=category_map
    )


def batch_collate(settings: RTDETRv2Settings) -> Callable:
    """Training batches resized to a random square of --multiscale_sizes until --multiscale_stop_epoch."""
    from datasets.rtdetr_transforms import MultiScaleCollate

    return MultiScaleCollate(settings.multiscale_sizes, stop_epoch=settings.multiscale_stop_epoch)
