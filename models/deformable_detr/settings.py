"""Deformable DETR's settings, and the multi-scale flags DINO shares with it."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import DetectorSettings

__all__ = ["DeformableDETRSettings", "MultiScaleSettings"]


@dataclass(frozen=True)
class MultiScaleSettings(DetectorSettings):
    """``DetectorSettings`` plus the flags of the deformable-attention families (Deformable DETR, DINO).

    Attributes:
        num_feature_levels: L, backbone levels plus extra stride-2 levels.
        enc_n_points, dec_n_points: deformable sampling points per head and level.
        cls_loss_coef: weight of the focal classification loss.
        focal_alpha: alpha of the focal classification loss.
        position_embedding_scale: the sine encoding's scale.
        masks, pre_norm, box_refine, spatial_prior: DETR's options, read only to refuse them (``check_settings``).
    """

    num_feature_levels: int
    enc_n_points: int
    dec_n_points: int
    cls_loss_coef: float
    focal_alpha: float
    position_embedding_scale: float
    masks: bool
    pre_norm: bool
    box_refine: bool
    spatial_prior: str


@dataclass(frozen=True)
class DeformableDETRSettings(MultiScaleSettings):
    """``MultiScaleSettings`` plus with_box_refine (iterative refinement) and two_stage (encoder proposals)."""

    with_box_refine: bool
    two_stage: bool
