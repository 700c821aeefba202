"""RT-DETRv2 (Lv et al. 2024): PResNet-vd backbone, hybrid encoder, query-selecting refining decoder."""

from .build import build, build_criterion, build_model
from .config import RECIPES, RTDETRv2Config, recipe
from .criterion import RTDETRCriterionv2, rtdetr_weight_dict
from .decoder import MSDeformableAttention, RTDETRTransformerv2, generate_anchors
from .hybrid_encoder import HybridEncoder, sincos_2d_position_embedding
from .postprocess import COCO_CATEGORY_IDS, RTDETRPostProcessor
from .rtdetr import RTDETR

__all__ = [
    "COCO_CATEGORY_IDS",
    "RECIPES",
    "RTDETR",
    "HybridEncoder",
    "MSDeformableAttention",
    "RTDETRCriterionv2",
    "RTDETRPostProcessor",
    "RTDETRTransformerv2",
    "RTDETRv2Config",
    "build",
    "build_criterion",
    "build_model",
    "generate_anchors",
    "recipe",
    "rtdetr_weight_dict",
    "sincos_2d_position_embedding",
]
