"""Deformable DETR (Zhu et al., ICLR 2021): the family's table row ``FAMILY`` and its published names.

As in the published code, ``SetCriterion`` is the focal-loss criterion and ``PostProcess`` the top-k one here.
"""

from __future__ import annotations

from ..family import Family
from ..focal_criterion import FocalSetCriterion as SetCriterion
from ..postprocess import PostProcessTopK as PostProcess
from .build import build
from .checkpoint import architecture, owns_state_dict
from .model import DeformableDETR
from .settings import DeformableDETRSettings

__all__ = ["FAMILY", "DeformableDETR", "DeformableDETRSettings", "PostProcess", "SetCriterion", "build"]

# Published defaults that differ from the parser's (DETR's): the authors' main.py / configs (DESIGN_DEFORMABLE.md).
DEFAULTS = {
    "lr": 2e-4,
    "lr_backbone": 2e-5,
    "lr_backbone_names": ["backbone.0"],
    "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
    "epochs": 50,
    "lr_drop": 40,
    "dim_feedforward": 1024,
    "num_queries": 300,
    "set_cost_class": 2.0,
    "cls_loss_coef": 2.0,
}

FAMILY = Family(
    name="deformable_detr",
    title="Deformable DETR",
    settings=DeformableDETRSettings,
    build=build,
    owns_state_dict=owns_state_dict,
    architecture=architecture,
    defaults=DEFAULTS,
    default_num_classes={"coco": 91, "synthetic": 91, "coco_panoptic": 250},
    # The five published R50 recipes (box AP on COCO val2017 after 50 epochs as published).
    weights_source="https://github.com/fundamentalvision/Deformable-DETR (Google Drive)",
    hub_recipes={
        "deformable_detr_resnet50": {},  # 44.5
        "deformable_detr_resnet50_single_scale": {"num_feature_levels": 1},  # 39.4
        "deformable_detr_resnet50_single_scale_dc5": {"num_feature_levels": 1, "dilation": True},  # 41.5
        "deformable_detr_resnet50_refine": {"with_box_refine": True},  # 46.2
        "deformable_detr_resnet50_two_stage": {"with_box_refine": True, "two_stage": True},  # 46.9
    },
    # Per-layer class heads (also listed inside the decoder when two-stage) and the query embeddings.
    head_prefixes=("class_embed.", "query_embed.", "transformer.decoder.class_embed."),
    keep_initial_heads=True,  # re-initialised class heads keep the focal-loss prior (bias -4.6)
)
