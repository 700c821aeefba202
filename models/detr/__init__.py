"""DETR (Carion et al., ECCV 2020): the family's table row ``FAMILY`` and its published names.

``models.detr.DETR``, ``SetCriterion``, ``PostProcess``, ``MLP`` and ``build`` are the published import paths.
"""

from __future__ import annotations

from ..criterion import SetCriterion
from ..family import Family
from ..heads import MLP
from ..postprocess import PostProcess
from .build import build
from .checkpoint import architecture, owns_state_dict
from .model import DETR
from .settings import DETRSettings

__all__ = ["DETR", "FAMILY", "MLP", "DETRSettings", "PostProcess", "SetCriterion", "build"]


def _hub_recipe(backbone: str, dilation: bool, masks: bool) -> dict[str, object]:
    return {"backbone": backbone, "dilation": dilation, "masks": masks,
            "dataset_file": "coco_panoptic" if masks else "coco"}  # fmt: skip


FAMILY = Family(
    name="detr",
    title="DETR",
    settings=DETRSettings,
    build=build,
    owns_state_dict=owns_state_dict,
    architecture=architecture,
    defaults={},  # the parser's defaults are DETR's
    default_num_classes={"coco": 91, "synthetic": 91, "coco_panoptic": 250},
    hub_recipes={
        "detr_resnet50": _hub_recipe("resnet50", False, False),
        "detr_resnet50_dc5": _hub_recipe("resnet50", True, False),
        "detr_resnet101": _hub_recipe("resnet101", False, False),
        "detr_resnet101_dc5": _hub_recipe("resnet101", True, False),
        "detr_resnet50_panoptic": _hub_recipe("resnet50", False, True),
        "detr_resnet50_dc5_panoptic": _hub_recipe("resnet50", True, True),
        "detr_resnet101_panoptic": _hub_recipe("resnet101", False, True),
    },
    # The class head (num_classes + 1 outputs) and the query embeddings; under "detr." in a DETRsegm model.
    head_prefixes=("class_embed.", "query_embed."),
)
