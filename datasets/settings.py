"""The data flags every dataset builder reads, as one typed object (filled from the command line once)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DataSettings"]


@dataclass(frozen=True)
class DataSettings:
    """Where the data is and how it is read (field names are the command-line flags').

    ``dataset_file``: 'coco', 'synthetic' or 'coco_panoptic'; paths are None when not given; ``num_classes`` None
    means "infer from the annotations"; ``eval`` says whether the run only evaluates (no training split needed).
    """

    dataset_file: str = "coco"
    coco_path: str | None = None
    coco_panoptic_path: str | None = None
    train_img_folder: str | None = None
    val_img_folder: str | None = None
    train_ann_file: str | None = None
    val_ann_file: str | None = None
    synthetic_dir: str | None = None
    synthetic_train_size: int | None = None
    synthetic_val_size: int | None = None
    masks: bool = False
    input_scale: float = 1.0
    skip_bad_images: bool = False
    num_classes: int | None = None
    eval: bool = False
    # Labels are indices of the sorted category ids (a family's contiguous_labels): any id fits the classifier.
    remap_categories: bool = False

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> DataSettings:
        """The settings from flag values (e.g. ``vars(args)``); other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def img_folder(self, image_set: str) -> str | None:
        """--train_img_folder / --val_img_folder."""
        return self.train_img_folder if image_set == "train" else self.val_img_folder

    def ann_file(self, image_set: str) -> str | None:
        """--train_ann_file / --val_ann_file."""
        return self.train_ann_file if image_set == "train" else self.val_ann_file
