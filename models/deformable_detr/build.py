"""``build(settings, num_classes) -> (model, criterion, postprocessors)`` of Deformable DETR."""

from __future__ import annotations

from collections.abc import Sequence

from ..criterion import expand_weight_dict, place_criterion
from ..family import BuildResult
from ..focal_criterion import FocalSetCriterion
from ..matcher import build_matcher
from ..multiscale import build_multiscale_backbone
from ..postprocess import PostProcessTopK
from .model import DeformableDETR
from .settings import DeformableDETRSettings, MultiScaleSettings
from .transformer import DeformableTransformer

__all__ = ["build", "build_deformable_criterion", "build_deformable_weight_dict", "check_settings"]


def check_settings(
    settings: MultiScaleSettings,
    model: str,
    two_stage: bool = False,
    with_box_refine: bool = False,
    return_interm_indices: Sequence[int] = (),
) -> None:
    """Flags that do not combine with the deformable family ``model`` (its --model): ValueError naming them.

    ``return_interm_indices``: the ResNet stages the family takes as levels (DINO), checked against
    --backbone_stages (Deformable DETR takes the C3-C5 that exist).
    """
    family = f"--model {model}"
    conflicts = {
        "--masks": settings.masks,
        "--pre_norm": settings.pre_norm,
        "--box_refine (use --with_box_refine)": settings.box_refine,
        f"--spatial_prior {settings.spatial_prior}": settings.spatial_prior != "none",
        "--position_embedding learned": settings.position_embedding in ("learned", "v3"),
    }
    for flag, given in conflicts.items():
        if given:
            raise ValueError(f"{flag} is not supported with {family}; drop one of them")
    stages = settings.backbone_stages
    needed = sorted(return_interm_indices)
    if needed and needed[-1] >= stages:
        raise ValueError(
            f"--backbone_stages {stages} keeps ResNet stages 0..{stages - 1} but --return_interm_indices {needed} "
            f"needs stage {needed[-1]}: raise --backbone_stages or pass --return_interm_indices within 0..{stages - 1}"
        )
    if two_stage and not with_box_refine:
        raise ValueError("--two_stage needs --with_box_refine (the published two-stage recipe uses both)")
    if settings.hidden_dim % 32:
        raise ValueError(
            f"--hidden_dim {settings.hidden_dim}: {family} needs a multiple of 32 (GroupNorm(32) projections)"
        )


def build_deformable_weight_dict(settings: MultiScaleSettings) -> dict[str, float]:
    """Published Deformable DETR loss weights (21 entries for 6 decoder layers).

    With aux_loss, every weight is copied for each earlier decoder layer (``_0`` ... ``_{dec_layers-2}``) and for
    ``_enc``; the ``_enc`` copies are present even without --two_stage (published).
    """
    weight_dict = {
        "loss_ce": settings.cls_loss_coef, "loss_bbox": settings.bbox_loss_coef, "loss_giou": settings.giou_loss_coef,
    }  # fmt: skip
    if settings.aux_loss:
        weight_dict = expand_weight_dict(weight_dict, [f"_{i}" for i in range(settings.dec_layers - 1)] + ["_enc"])
    return weight_dict


def build_deformable_criterion(settings: MultiScaleSettings, num_classes: int) -> FocalSetCriterion:
    """FocalSetCriterion of the published Deformable DETR recipe: the focal matching cost with its fixed alpha 0.25
    (independent of --focal_alpha, published), the loss's alpha --focal_alpha. The caller moves it to the device."""
    return FocalSetCriterion(
        num_classes,
        matcher=build_matcher(settings, class_cost="focal", focal_alpha=0.25),
        weight_dict=build_deformable_weight_dict(settings),
        losses=["labels", "boxes", "cardinality"],
        focal_alpha=settings.focal_alpha,
    )


def build(settings: DeformableDETRSettings, num_classes: int) -> BuildResult:
    """Deformable DETR, its focal-loss SetCriterion and the top-100 'bbox' postprocessor.

    Raises:
        ValueError: naming the flags that do not combine (``check_settings``, --num_feature_levels 2).
    """
    check_settings(settings, "deformable_detr", settings.two_stage, settings.with_box_refine)
    if settings.num_feature_levels == 2:
        raise ValueError("--num_feature_levels 2: Deformable DETR uses 1 (single-scale) or >= 3 levels")
    stages = settings.backbone_stages
    # Published: C3-C5 (layer2-4) for multi-scale, C5 alone for single-scale; a truncated ResNet keeps what it has.
    stage_indices = [i for i in (1, 2, 3) if i < stages] if settings.num_feature_levels > 1 else [stages - 1]
    transformer = DeformableTransformer(
        d_model=settings.hidden_dim, nhead=settings.nheads, num_encoder_layers=settings.enc_layers,
        num_decoder_layers=settings.dec_layers, dim_feedforward=settings.dim_feedforward, dropout=settings.dropout,
        num_feature_levels=settings.num_feature_levels, dec_n_points=settings.dec_n_points,
        enc_n_points=settings.enc_n_points, two_stage=settings.two_stage,
        two_stage_num_proposals=settings.num_queries, attention=settings.attention,
    )  # fmt: skip
    # Published sine encoding: cell centres (offset -0.5), --position_embedding_scale.
    backbone = build_multiscale_backbone(settings, stage_indices, scale=settings.position_embedding_scale, offset=-0.5)
    model = DeformableDETR(
        backbone, transformer, num_classes=num_classes,
        num_queries=settings.num_queries, num_feature_levels=settings.num_feature_levels, aux_loss=settings.aux_loss,
        with_box_refine=settings.with_box_refine, two_stage=settings.two_stage,
    )  # fmt: skip
    criterion = place_criterion(build_deformable_criterion(settings, num_classes), settings.device)
    return model, criterion, {"bbox": PostProcessTopK(num_select=100)}
