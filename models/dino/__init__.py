"""DINO (Zhang et al., ICLR 2023): the family's table row ``FAMILY`` and its published names.

As in the published code, ``SetCriterion`` is DINO's criterion and ``PostProcess`` the top-k one here.
"""

from __future__ import annotations

import math

from ..deformable_detr import DEFAULTS as DEFORMABLE_DEFAULTS
from ..family import Family
from ..postprocess import PostProcessTopK as PostProcess
from .build import build
from .checkpoint import architecture, owns_state_dict
from .criterion import DINOCriterion as SetCriterion
from .model import DINO
from .settings import DINOSettings

__all__ = ["DINO", "FAMILY", "DINOSettings", "PostProcess", "SetCriterion", "build"]

# Published defaults that differ from the parser's (DETR's): config/DINO/DINO_4scale.py (DESIGN_DINO.md).
DEFAULTS = {
    **DEFORMABLE_DEFAULTS,
    "lr": 1e-4,
    "lr_backbone": 1e-5,
    "epochs": 12,
    "lr_drop": 11,
    "dim_feedforward": 2048,
    "dropout": 0.0,
    "num_queries": 900,
    "cls_loss_coef": 1.0,
    "position_embedding_scale": 2 * math.pi,
}

FAMILY = Family(
    name="dino",
    title="DINO",
    settings=DINOSettings,
    build=build,
    owns_state_dict=owns_state_dict,
    architecture=architecture,
    defaults=DEFAULTS,
    default_num_classes={"coco": 91, "synthetic": 91, "coco_panoptic": 250},
    # R50 (box AP on COCO val2017 as published: 4-scale 49.0 after 12 epochs, 5-scale 51.3 after 24).
    weights_source="https://github.com/IDEA-Research/DINO (Google Drive)",
    hub_recipes={
        "dino_resnet50_4scale": {},
        "dino_resnet50_5scale": {"num_feature_levels": 5, "return_interm_indices": [0, 1, 2, 3]},
    },
    # The published DINO code has neither flag: it always selects encoder proposals and refines every layer.
    refused_flags={
        "two_stage": "a Deformable DETR flag: DINO is always two-stage; drop --two_stage",
        "with_box_refine": "a Deformable DETR flag: DINO always refines boxes layer by layer; drop --with_box_refine",
    },
    # Per-layer class heads (also inside the decoder), the encoder head, the denoising label book and the
    # learned query contents.
    head_prefixes=(
        "class_embed.",
        "transformer.decoder.class_embed.",
        "transformer.enc_out_class_embed.",
        "label_enc.",
        "transformer.tgt_embed.",
    ),
    keep_initial_heads=True,  # re-initialised class heads keep the focal-loss prior (bias -4.6)
)
