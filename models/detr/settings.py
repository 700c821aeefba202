"""DETR's settings: the flags ``models.detr.build`` reads."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import DetectorSettings

__all__ = ["DETRSettings"]


@dataclass(frozen=True)
class DETRSettings(DetectorSettings):
    """``DetectorSettings`` plus DETR's own flags.

    Attributes:
        pre_norm: pre-norm transformer layers.
        masks: add the mask head (DETRsegm) and its losses.
        frozen_weights: a checkpoint whose detector is frozen (mask-head training), or None.
        eos_coef: cross-entropy weight of the "no object" class.
        mask_loss_coef, dice_loss_coef: mask loss weights (with ``masks``).
        spatial_prior: 'none' (published) or 'gaussian' (decoder attention prior around each query's box).
        box_refine: every decoder layer refines the previous layer's box with the one box head.
        with_box_refine, two_stage: Deformable DETR's flags, read only to refuse them with a hint (a published
            Deformable DETR command line without --model).
    """

    pre_norm: bool
    masks: bool
    frozen_weights: str | None
    eos_coef: float
    mask_loss_coef: float
    dice_loss_coef: float
    spatial_prior: str
    box_refine: bool
    with_box_refine: bool
    two_stage: bool
