"""``build(settings, num_classes) -> (model, criterion, postprocessors)`` of DETR (and DETRsegm with --masks)."""

from __future__ import annotations

from torch import nn

from ..backbone import build_backbone
from ..criterion import SetCriterion, expand_weight_dict, place_criterion
from ..family import BuildResult
from ..matcher import build_matcher
from ..postprocess import PostProcess
from .model import DETR
from .settings import DETRSettings
from .transformer import build_transformer

__all__ = ["build"]


def build(settings: DETRSettings, num_classes: int) -> BuildResult:
    """Model, criterion and postprocessors ('bbox'; plus 'segm' and, for coco_panoptic, 'panoptic' with --masks).

    Raises:
        ValueError: naming the flags that do not combine (a Deformable DETR flag, --frozen_weights without --masks).
    """
    for flag, given in (("with_box_refine", settings.with_box_refine), ("two_stage", settings.two_stage)):
        if given:  # a published Deformable DETR command line without --model
            raise ValueError(f"--{flag} is a Deformable DETR flag: add --model deformable_detr (--model is detr)")
    if settings.frozen_weights is not None and not settings.masks:
        raise ValueError("--frozen_weights is for training the mask head only: add --masks")
    model: nn.Module = DETR(
        build_backbone(settings, return_interm_layers=settings.masks),
        build_transformer(settings),
        num_classes=num_classes,
        num_queries=settings.num_queries,
        aux_loss=settings.aux_loss,
        spatial_prior=settings.spatial_prior,
        box_refine=settings.box_refine,
    )
    if settings.masks:
        from .segmentation import DETRsegm  # lazy: only the mask variant needs it

        model = DETRsegm(model, freeze_detr=settings.frozen_weights is not None)

    weight_dict = {"loss_ce": 1, "loss_bbox": settings.bbox_loss_coef, "loss_giou": settings.giou_loss_coef}
    if settings.masks:
        weight_dict["loss_mask"] = settings.mask_loss_coef
        weight_dict["loss_dice"] = settings.dice_loss_coef
    if settings.aux_loss:
        weight_dict = expand_weight_dict(weight_dict, [f"_{i}" for i in range(settings.dec_layers - 1)])
    losses = ["labels", "boxes", "cardinality"] + (["masks"] if settings.masks else [])
    criterion = SetCriterion(
        num_classes, matcher=build_matcher(settings), weight_dict=weight_dict, eos_coef=settings.eos_coef,
        losses=losses,
    )  # fmt: skip
    place_criterion(criterion, settings.device)

    postprocessors: dict[str, nn.Module] = {"bbox": PostProcess()}
    if settings.masks:
        from .segmentation import PostProcessPanoptic, PostProcessSegm

        postprocessors["segm"] = PostProcessSegm()
        if settings.dataset_file == "coco_panoptic":
            # Published rule: category ids up to 90 are things, the rest stuff.
            is_thing_map = {i: i <= 90 for i in range(201)}
            postprocessors["panoptic"] = PostProcessPanoptic(is_thing_map, threshold=0.85)
    return model, criterion, postprocessors
