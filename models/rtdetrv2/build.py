"""Build RT-DETRv2 (model, criterion, post-processor) from an :class:`RTDETRv2Config` or the family's settings."""

from __future__ import annotations

from torch import nn

from models.criterion import place_criterion
from models.matcher import HungarianMatcher
from models.presnet import build_presnet, load_presnet_weights

from .config import RTDETRv2Config
from .criterion import RTDETRCriterionv2, rtdetr_weight_dict
from .decoder import RTDETRTransformerv2
from .hybrid_encoder import HybridEncoder
from .postprocess import COCO_CATEGORY_IDS, RTDETRPostProcessor
from .rtdetr import RTDETR
from .settings import RTDETRv2Settings

__all__ = ["build", "build_criterion", "build_model"]


def build_model(cfg: RTDETRv2Config, num_classes: int) -> RTDETR:
    """The detector; the backbone loads ``cfg.backbone_weights`` (a local file) when given."""
    if num_classes < 1:
        raise ValueError(f"RT-DETRv2: num_classes must be >= 1, got {num_classes}")
    backbone = build_presnet(cfg.backbone, cfg.return_interm_indices, cfg.freeze_at, cfg.freeze_norm)
    if cfg.backbone_weights:
        load_presnet_weights(backbone, cfg.backbone_weights)
    encoder = HybridEncoder(
        in_channels=backbone.out_channels,
        hidden_dim=cfg.enc_hidden_dim,
        nhead=cfg.nheads,
        dim_feedforward=cfg.enc_dim_feedforward,
        num_layers=cfg.enc_layers,
        dropout=cfg.dropout,
        expansion=cfg.enc_expansion,
        eval_spatial_size=cfg.eval_spatial_size,
    )
    decoder = RTDETRTransformerv2(
        num_classes=num_classes,
        hidden_dim=cfg.hidden_dim,
        num_queries=cfg.num_queries,
        feat_channels=[cfg.enc_hidden_dim] * 3,
        num_layers=cfg.dec_layers,
        nhead=cfg.nheads,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        n_points=cfg.dec_n_points,
        num_denoising=cfg.dn_number,
        label_noise_ratio=cfg.dn_label_noise_ratio,
        box_noise_scale=cfg.dn_box_noise_scale,
        eval_idx=cfg.eval_idx,
        eval_spatial_size=cfg.eval_spatial_size,
        aux_loss=cfg.aux_loss,
    )
    return RTDETR(backbone, encoder, decoder)


def build_criterion(cfg: RTDETRv2Config, num_classes: int) -> RTDETRCriterionv2:
    """VFL criterion with the focal-cost matcher (GIoU without epsilon) and the full weight_dict."""
    matcher = HungarianMatcher(
        cost_class=cfg.set_cost_class,
        cost_bbox=cfg.set_cost_bbox,
        cost_giou=cfg.set_cost_giou,
        class_cost="focal",
        focal_alpha=cfg.focal_alpha,
    )
    weights = rtdetr_weight_dict(cfg.dec_layers, cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef)
    return RTDETRCriterionv2(matcher, weights, num_classes, alpha=cfg.vfl_alpha)


def build(
    cfg: RTDETRv2Config | RTDETRv2Settings, num_classes: int
) -> tuple[RTDETR, RTDETRCriterionv2, dict[str, nn.Module]]:
    """(model, criterion, {'bbox': post-processor}); the family's ``build`` (``Family.build``).

    ``cfg``: a config, or the parsed flags (:class:`RTDETRv2Settings`, mapped by ``model_config``; the criterion
    then goes to ``--device``). The post-processor maps labels 0..79 to the COCO category ids when
    ``cfg.remap_mscoco_category`` and num_classes is 80; otherwise labels stay class indices (the training loop
    maps a custom dataset's labels back to its ids).

    Raises:
        ValueError: one line naming the flag RT-DETRv2 cannot build with.
    """
    device = None
    if isinstance(cfg, RTDETRv2Settings):
        cfg, device = cfg.model_config(), cfg.device
    model = build_model(cfg, num_classes)
    remap = cfg.remap_mscoco_category and num_classes == len(COCO_CATEGORY_IDS)
    post = RTDETRPostProcessor(cfg.num_select, COCO_CATEGORY_IDS if remap else None)
    criterion = build_criterion(cfg, num_classes)
    if device is not None:
        criterion = place_criterion(criterion, device)
    return model, criterion, {"bbox": post}
