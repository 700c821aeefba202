"""RT-DETRv2 (Lv et al. 2024): PResNet-vd backbone, hybrid encoder, query-selecting refining decoder.

The family's table row is ``FAMILY`` (``--model rtdetrv2``); its defaults are the R50vd 6x recipe and
``hub_recipes`` holds the flag values of the five published COCO recipes (DESIGN_RTDETR.md).
"""

from ..family import Family
from .build import build, build_criterion, build_model
from .checkpoint import architecture, owns_state_dict
from .config import RECIPES, RTDETRv2Config, recipe
from .criterion import RTDETRCriterionv2, rtdetr_weight_dict
from .data import batch_collate, contiguous_labels, data_transforms
from .decoder import MSDeformableAttention, RTDETRTransformerv2, generate_anchors
from .hybrid_encoder import HybridEncoder, sincos_2d_position_embedding
from .postprocess import COCO_CATEGORY_IDS, RTDETRPostProcessor
from .rtdetr import RTDETR
from .settings import RTDETRv2Settings

__all__ = [
    "COCO_CATEGORY_IDS",
    "DEFAULTS",
    "FAMILY",
    "RECIPES",
    "RECIPE_FLAGS",
    "RTDETR",
    "HybridEncoder",
    "MSDeformableAttention",
    "RTDETRCriterionv2",
    "RTDETRPostProcessor",
    "RTDETRTransformerv2",
    "RTDETRv2Config",
    "RTDETRv2Settings",
    "build",
    "build_criterion",
    "build_model",
    "generate_anchors",
    "recipe",
    "rtdetr_weight_dict",
    "sincos_2d_position_embedding",
]

# The family defaults: the R50vd 6x recipe (rtdetrv2_r50vd_6x_coco.yml), every value of the contract's list
# "Existing flags, family defaults" plus the new flags whose parser default (off for the other families) differs.
DEFAULTS = {
    "backbone": "presnet50vd",
    "return_interm_indices": [1, 2, 3],
    "hidden_dim": 256,
    "nheads": 8,
    "enc_layers": 1,
    "dec_layers": 6,
    "dim_feedforward": 1024,
    "dropout": 0.0,
    "num_queries": 300,
    "num_feature_levels": 3,
    "dec_n_points": 4,
    "dn_number": 100,
    "dn_label_noise_ratio": 0.5,
    "dn_box_noise_scale": 1.0,
    "focal_alpha": 0.25,
    "set_cost_class": 2.0,
    "set_cost_bbox": 5.0,
    "set_cost_giou": 2.0,
    "cls_loss_coef": 1.0,  # the weight of loss_vfl
    "bbox_loss_coef": 5.0,
    "giou_loss_coef": 2.0,
    "num_select": 300,
    "lr": 1e-4,
    "lr_backbone": 1e-5,
    "lr_backbone_names": ["backbone"],
    "weight_decay": 1e-4,
    "epochs": 72,
    "lr_drop": 1000,  # MultiStepLR(milestones [1000]): never fires, the lr stays constant
    "clip_max_norm": 0.1,
    "batch_size": 4,
    # Solver flags that are off by default for the other families.
    "norm_weight_decay": 0.0,
    "ema_decay": 0.9999,
    "ema_warmups": 2000,
    "warmup_iters": 2000,
    "sync_bn": True,
}

# The five published COCO recipes as flag values after ``--model rtdetrv2`` (published COCO val AP in comments).
RECIPE_FLAGS: dict[str, dict[str, object]] = {
    "rtdetrv2_r18vd": {  # 120e, 48.1 AP
        "backbone": "presnet18vd", "freeze_at": -1, "freeze_norm": False, "enc_expansion": 0.5, "dec_layers": 3,
        "epochs": 120, "aug_stop_epoch": 117, "multiscale_sizes": [], "lr_backbone": 1e-4,
    },
    "rtdetrv2_r34vd": {  # 120e, 49.9 AP
        "backbone": "presnet34vd", "freeze_at": -1, "freeze_norm": False, "enc_expansion": 0.5, "dec_layers": 4,
        "epochs": 120, "aug_stop_epoch": 117, "multiscale_stop_epoch": 117, "lr_backbone": 5e-5,
        "bias_weight_decay": 0.0,
    },
    "rtdetrv2_r50vd": {},  # 6x, 53.4 AP
    "rtdetrv2_r50vd_m": {  # 7x, 51.9 AP
        "enc_expansion": 0.5, "eval_idx": 2, "epochs": 84, "aug_stop_epoch": 81, "multiscale_stop_epoch": 81,
    },
    "rtdetrv2_r101vd": {  # 6x, 54.3 AP
        "backbone": "presnet101vd", "enc_hidden_dim": 384, "enc_dim_feedforward": 2048, "lr_backbone": 1e-6,
    },
}  # fmt: skip

_NOT_BUILT = "RT-DETRv2 has no"
FAMILY = Family(
    name="rtdetrv2",
    title="RT-DETRv2",
    settings=RTDETRv2Settings,
    build=build,
    owns_state_dict=owns_state_dict,
    architecture=architecture,
    defaults=DEFAULTS,
    # Published remap_mscoco_category: COCO's 80 categories as labels 0..79; the generated dataset's 6 likewise.
    default_num_classes={"coco": 80, "synthetic": 6},
    weights_source="https://github.com/lyuwenyu/RT-DETR (rtdetrv2_pytorch)",
    hub_recipes=RECIPE_FLAGS,
    refused_flags={
        "masks": f"a DETR flag: {_NOT_BUILT} mask head; drop --masks",
        "dilation": f"a DETR flag: {_NOT_BUILT} dilated backbone stage (PResNet-vd strides 8/16/32); drop --dilation",
        "pre_norm": f"a DETR flag: {_NOT_BUILT} pre-norm layers (published post-norm); drop --pre_norm",
        "position_embedding": f"a DETR flag: {_NOT_BUILT} choice of position encoding (2-D sincos); drop "
        "--position_embedding",
    },
    # The encoder and per-layer score heads and the denoising class embedding (queries are selected, not learned).
    head_prefixes=("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed."),
    keep_initial_heads=True,  # re-initialised score heads keep the focal prior (bias -log(99))
    contiguous_labels=contiguous_labels,
    data_transforms=data_transforms,
    batch_collate=batch_collate,
)
