"""Deformable DETR (Zhu et al., ICLR 2021): DETR with multi-scale deformable attention, optional iterative box
refinement and two-stage proposals, and ``build(args) -> (model, criterion, postprocessors)``.

Published quirks reproduced here: the heads are shared (plain) or cloned (refinement) and additionally registered
inside the decoder, so they appear under several state-dict keys; the class head has no "no object" logit.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import Tensor, nn

from util.arguments import family_flag_error
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .backbone import Backbone, Joiner, _downsample_mask_nearest
from .box_refinement import refine_boxes
from .deformable_transformer import DeformableTransformer
from .detr import MLP
from .focal_criterion import FocalSetCriterion as SetCriterion  # published names
from .position_encoding import build_position_encoding
from .postprocess import PostProcessTopK as PostProcess

__all__ = [
    "MLP",
    "DeformableDETR",
    "GroupNorm",
    "PostProcess",
    "SetCriterion",
    "build",
    "build_input_proj",
    "build_multiscale_backbone",
    "init_detection_heads",
    "project_levels",
]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, state-dict keys and numbers) that also takes a group of a single value.

    torch refuses a batch whose groups all hold one value ("Expected more than 1 value per channel when
    training"): the coarsest extra level of a small image is 1x1, and with ``--hidden_dim 32`` a group is one
    channel, so batch size 1 failed. GroupNorm normalises each image on its own, so the same image in a larger
    batch already got the defined answer (a zero-variance group normalises to 0: the output is the bias); the
    kernel computes it for batch size 1 too.
    """

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, *] -> [B, C, *]; ``F.group_norm`` without its batch-size check."""
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def build_input_proj(backbone_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """``input_proj.{l}``: 1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 convs for extra levels
    (the first reads the last backbone map, later ones the previous projected level)."""
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), GroupNorm(32, hidden_dim)) for c in backbone_channels]
    in_channels = backbone_channels[-1]
    for _ in range(num_feature_levels - len(backbone_channels)):
        projections.append(
            nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1), GroupNorm(32, hidden_dim))
        )
        in_channels = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projections)


def project_levels(backbone: Joiner, input_proj: nn.ModuleList, samples: NestedTensor | list[Tensor] | Tensor):
    """Backbone levels plus the extra stride-2 levels -> (srcs, masks, positions), L each, finest first.

    ``samples``: a NestedTensor, a list of [3, H_i, W_i] images (padded here) or a [B, 3, H, W] batch.
    """
    if not isinstance(samples, NestedTensor):
        samples = nested_tensor_from_tensor_list(samples)
    if samples.mask is None:
        images = samples.tensors
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        samples = NestedTensor(images, mask)
    features, pos = backbone(samples)
    srcs = [proj(feature.tensors) for proj, feature in zip(input_proj, features)]
    masks = [feature.mask for feature in features]
    pos = list(pos)
    image_mask = samples.mask
    for lvl in range(len(features), len(input_proj)):
        # The first extra level reads the raw last backbone map, the next ones the previous projected level.
        src = input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
        # Extra levels resize the image mask itself, not the previous level's mask.
        mask = _downsample_mask_nearest(image_mask, src.shape[-2:])
        srcs.append(src)
        masks.append(mask)
        pos.append(backbone[1](NestedTensor(src, mask)).to(src.dtype))
    return srcs, masks, pos


def init_detection_heads(class_embed: nn.Linear, bbox_embed: MLP, prior_prob: float = 0.01) -> None:
    """Focal-loss prior on the class bias (every class starts at probability 0.01); box head's last layer zero."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.constant_(bbox_embed.layers[-1].weight, 0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0)


class DeformableDETR(nn.Module):
    """Backbone levels -> deformable encoder-decoder -> per-layer class and box heads.

    Args:
        backbone: ``Joiner`` whose Backbone returns the feature levels (``stage_channels``).
        transformer: ``DeformableTransformer``.
        num_classes: K sigmoid class logits (91 for COCO; no "no object" class).
        num_queries: Q.
        num_feature_levels: L (backbone levels plus extra stride-2 levels).
        aux_loss: also return every earlier decoder layer's predictions.
        with_box_refine: each decoder layer refines the previous layer's boxes with its own head.
        two_stage: queries from encoder proposals (needs ``with_box_refine``, as published).
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False):  # fmt: skip
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = build_input_proj(backbone[0].stage_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone
        init_detection_heads(class_embed, bbox_embed)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            # Independent copies per layer; only the first starts with w, h = sigmoid(-2).
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            transformer.decoder.bbox_embed = self.bbox_embed  # published: the same modules, keys listed twice
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # One head shared by every layer, listed under each index (published key layout).
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def forward(self, samples: NestedTensor | list[Tensor] | Tensor) -> dict:
        """Detect objects.

        Args:
            samples: NestedTensor ([B, 3, H, W], mask [B, H, W] True on padding), a list of [3, H_i, W_i] images
                or a [B, 3, H, W] tensor.

        Returns:
            'pred_logits' [B, Q, K] (sigmoid logits), 'pred_boxes' [B, Q, 4] (cx, cy, w, h in [0, 1] of the
            unpadded image); with aux_loss 'aux_outputs' (earlier layers, first first); with two_stage
            'enc_outputs' {'pred_logits' [B, S, K], 'pred_boxes' [B, S, 4]} over all S encoder tokens.
        """
        srcs, masks, pos = project_levels(self.backbone, self.input_proj, samples)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed
        )
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            # Layer l predicts relative to the reference it used: the initial one, then layer l-1's refinement.
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(refine_boxes(self.bbox_embed[lvl](hs[lvl]), reference))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out


def build_multiscale_backbone(args: argparse.Namespace, stage_indices: list[int]) -> Joiner:
    """Backbone returning ResNet stages ``stage_indices`` (0 = layer1), with the family's position encoding.

    ``--backbone_stages`` (this project's truncated ResNet, e.g. for the CPU demos) keeps only the stages below it.
    """
    backbone = Backbone(
        args.backbone,
        train_backbone=args.lr_backbone > 0,
        return_interm_layers=len(stage_indices) > 1,
        dilation=args.dilation,
        weights=getattr(args, "backbone_weights", "imagenet"),
        stages=getattr(args, "backbone_stages", 4),
        return_interm_indices=stage_indices,
    )
    return Joiner(backbone, build_position_encoding(args))


def check_deformable_args(args: argparse.Namespace) -> None:
    """Flags that do not combine with the deformable families: ValueError naming both."""
    family = f"--model {args.model}"
    conflicts = {
        "--masks": args.masks,
        "--pre_norm": args.pre_norm,
        "--box_refine (use --with_box_refine)": getattr(args, "box_refine", False),
        f"--spatial_prior {getattr(args, 'spatial_prior', 'none')}": getattr(args, "spatial_prior", "none") != "none",
        "--position_embedding learned": args.position_embedding in ("learned", "v3"),
    }
    for flag, given in conflicts.items():
        if given:
            raise ValueError(f"{flag} is not supported with {family}; drop one of them")
    for dest in ("two_stage", "with_box_refine"):
        if args.model == "dino" and getattr(args, dest, False):  # DINO has both built in
            raise ValueError(family_flag_error([dest], "dino"))
    stages = getattr(args, "backbone_stages", 4)
    # DINO's feature levels are the ResNet stages it names; Deformable DETR takes the C3-C5 that exist.
    needed = sorted(args.return_interm_indices) if args.model == "dino" else []
    if needed and needed[-1] >= stages:
        raise ValueError(
            f"--backbone_stages {stages} keeps ResNet stages 0..{stages - 1} but --return_interm_indices {needed} "
            f"needs stage {needed[-1]}: raise --backbone_stages or pass --return_interm_indices within 0..{stages - 1}"
        )
    if args.two_stage and not args.with_box_refine:
        raise ValueError("--two_stage needs --with_box_refine (the published two-stage recipe uses both)")
    if args.hidden_dim % 32:
        raise ValueError(f"--hidden_dim {args.hidden_dim}: {family} needs a multiple of 32 (GroupNorm(32) projections)")


def build(args: argparse.Namespace):
    """Deformable DETR, its focal-loss SetCriterion and the top-100 'bbox' postprocessor."""
    from .detr import _criterion_device, num_classes_from_args
    from .focal_criterion import build_deformable_criterion
    from .postprocess import PostProcessTopK

    check_deformable_args(args)
    if args.num_feature_levels == 2:
        raise ValueError("--num_feature_levels 2: Deformable DETR uses 1 (single-scale) or >= 3 levels")
    stages = getattr(args, "backbone_stages", 4)
    # Published: C3-C5 (layer2-4) for multi-scale, C5 alone for single-scale; a truncated ResNet keeps what it has.
    stage_indices = [i for i in (1, 2, 3) if i < stages] if args.num_feature_levels > 1 else [stages - 1]
    transformer = DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points,
        two_stage=args.two_stage, two_stage_num_proposals=args.num_queries,
        attention=getattr(args, "attention", "sdpa"),
    )  # fmt: skip
    num_classes = num_classes_from_args(args)
    model = DeformableDETR(
        build_multiscale_backbone(args, stage_indices), transformer, num_classes=num_classes,
        num_queries=args.num_queries, num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
        with_box_refine=args.with_box_refine, two_stage=args.two_stage,
    )  # fmt: skip
    criterion = build_deformable_criterion(args, num_classes)
    device = _criterion_device(args.device)
    if device is not None:
        criterion.to(device)
    return model, criterion, {"bbox": PostProcessTopK(num_select=100)}
